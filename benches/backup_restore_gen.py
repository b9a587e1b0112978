#!/usr/bin/env python3
"""Generates the site benches/backup_restore.sh backs up and restores.

    backup_restore_gen.py sql BYTES > site.sql     # SQL for MariaDB: about BYTES of rows
    backup_restore_gen.py files DIR BYTES          # about BYTES of files below DIR

The text is pseudo-words (no dictionary needed) drawn with Zipf-like frequencies, with
punctuation: it compresses about as well as prose does (zstd -3: roughly 2.5-3x), neither
all zeros nor noise. Half of the files' bytes are "images" of random bytes (0.5-4 MB each,
incompressible like JPEGs), the other half many small text and HTML files (1-64 KB). The
output is the same for the same arguments (fixed seeds).
"""

import itertools
import os
import random
import sys

SYLLABLES = [
    c + v
    for c in ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "st", "tr", "ch", "sh"]
    for v in ["a", "e", "i", "o", "u", "ai", "ea", "ou", "an", "en", "er", "in", "on", "or"]
]


class Text:
    """Pseudo-prose from a 20,000-word vocabulary with Zipf-like frequencies."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        vocab_rng = random.Random(12345)
        words = set()
        while len(words) < 20000:
            n = vocab_rng.choice([1, 2, 2, 3, 3, 3, 4])
            words.add("".join(vocab_rng.choice(SYLLABLES) for _ in range(n)))
        words = sorted(words, key=lambda w: (len(w), w))
        vocab_rng.shuffle(words)
        # Punctuated variants of the commoner words end sentences and clauses.
        tokens = list(words) + [w + "." for w in words[:3000]] + [w + "," for w in words[:3000]]
        weights = [1 / (i + 1) ** 0.95 for i in range(len(words))]
        weights += [w * 0.9 for w in weights[:3000]] + [w * 0.6 for w in weights[:3000]]
        self.tokens = tokens
        self.cum = list(itertools.accumulate(weights))

    def words(self, count):
        return " ".join(self.rng.choices(self.tokens, cum_weights=self.cum, k=count))

    def chars(self, size):
        # About 7.3 characters a token with its space.
        out = self.words(max(1, size // 7))
        return out[:size]


def sql(total):
    text = Text(1)
    rng = random.Random(2)
    out = sys.stdout
    out.write(
        "SET autocommit=0;\n"
        "CREATE TABLE IF NOT EXISTS posts (id INT PRIMARY KEY AUTO_INCREMENT, author VARCHAR(64) NOT NULL, "
        "title VARCHAR(255) NOT NULL, body MEDIUMTEXT NOT NULL, views INT NOT NULL, "
        "created_at DATETIME NOT NULL, KEY (author), KEY (created_at)) ENGINE=InnoDB;\n"
        "CREATE TABLE IF NOT EXISTS comments (id INT PRIMARY KEY AUTO_INCREMENT, post_id INT NOT NULL, "
        "author VARCHAR(64) NOT NULL, body TEXT NOT NULL, KEY (post_id)) ENGINE=InnoDB;\n"
    )
    authors = [text.words(2).replace(".", "").replace(",", "") for _ in range(500)]
    written = 0
    post = 0
    batch_limit = 1 << 20
    while written < total:
        rows, size = [], 0
        comments = []
        while size < batch_limit and written + size < total:
            post += 1
            body_len = min(40000, max(300, int(rng.lognormvariate(8.1, 0.8))))
            body = text.chars(body_len)
            title = text.words(rng.randint(3, 9)).replace(".", "").replace(",", "")
            row = "('%s','%s','%s',%d,'20%02d-%02d-%02d %02d:%02d:%02d')" % (
                rng.choice(authors), title, body, rng.randint(0, 100000),
                rng.randint(10, 25), rng.randint(1, 12), rng.randint(1, 28),
                rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59))
            rows.append(row)
            size += len(row)
            for _ in range(rng.choice([0, 0, 1, 2, 3])):
                c = "(%d,'%s','%s')" % (post, rng.choice(authors), text.chars(rng.randint(80, 1200)))
                comments.append(c)
                size += len(c)
        if rows:
            out.write("INSERT INTO posts (author,title,body,views,created_at) VALUES\n" + ",\n".join(rows) + ";\n")
        if comments:
            out.write("INSERT INTO comments (post_id,author,body) VALUES\n" + ",\n".join(comments) + ";\n")
        out.write("COMMIT;\n")
        written += size
    out.write("COMMIT;\n")


def files(root, total):
    text = Text(3)
    rng = random.Random(4)
    images = total // 2
    made = 0
    n = 0
    while made < images:
        n += 1
        size = min(images - made, rng.randint(512 * 1024, 4 * 1024 * 1024))
        d = os.path.join(root, "20%02d" % rng.randint(15, 25), "%02d" % rng.randint(1, 12))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "photo-%05d.jpg" % n), "wb") as f:
            f.write(os.urandom(size))
        made += size
    while made < total:
        n += 1
        size = min(total - made, max(1024, min(64 * 1024, int(rng.lognormvariate(9.0, 0.9)))))
        d = os.path.join(root, "20%02d" % rng.randint(15, 25), "%02d" % rng.randint(1, 12), "docs")
        os.makedirs(d, exist_ok=True)
        if rng.random() < 0.5:
            body = text.chars(size)
            name = "note-%05d.txt" % n
        else:
            head = "<!doctype html>\n<html><head><title>%s</title></head><body>\n" % text.words(5)
            paras = []
            left = max(0, size - len(head) - 16)
            while left > 0:
                p = text.chars(min(left, rng.randint(200, 1500)))
                paras.append("<p>%s</p>\n" % p)
                left -= len(p) + 8
            body = head + "".join(paras) + "</body></html>\n"
            name = "page-%05d.html" % n
        with open(os.path.join(d, name), "w") as f:
            f.write(body)
        made += len(body)
    print("%d files, %d bytes" % (n, made), file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "sql":
        sql(int(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "files":
        files(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
