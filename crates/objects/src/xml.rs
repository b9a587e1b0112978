//! Just enough XML for S3's answers: the text of simple elements, which in S3's responses
//! never carry attributes, nest an element of the same name, or use CDATA.

use std::borrow::Cow;

/// The raw inner text of every `<tag>...</tag>` (and `<tag/>`, as ""), in document order.
pub(crate) fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let empty = format!("<{tag}/>");
    let close = format!("</{tag}>");
    let mut found = Vec::new();
    let mut rest = xml;
    loop {
        let next_open = rest.find(&open);
        let next_empty = rest.find(&empty);
        match (next_open, next_empty) {
            (Some(o), e) if e.is_none_or(|e| o < e) => {
                let inner = &rest[o + open.len()..];
                let Some(end) = inner.find(&close) else {
                    break;
                };
                found.push(&inner[..end]);
                rest = &inner[end + close.len()..];
            }
            (_, Some(e)) => {
                found.push("");
                rest = &rest[e + empty.len()..];
            }
            (None, None) => break,
            // Not reachable: the first arm takes an open tag whenever there is no empty tag.
            (Some(_), None) => break,
        }
    }
    found
}

/// The unescaped text of the first `<tag>`.
pub(crate) fn first(xml: &str, tag: &str) -> Option<String> {
    elements(xml, tag)
        .first()
        .map(|text| unescape(text).into_owned())
}

/// Resolves the five predefined entities and numeric character references.
pub(crate) fn unescape(text: &str) -> Cow<'_, str> {
    if !text.contains('&') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp..];
        let replacement = after.find(';').and_then(|semi| {
            let entity = &after[1..semi];
            let ch = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                    .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                    .or_else(|| entity.strip_prefix('#').and_then(|dec| dec.parse().ok()))
                    .and_then(char::from_u32),
            };
            ch.map(|ch| (ch, semi + 1))
        });
        match replacement {
            Some((ch, consumed)) => {
                out.push(ch);
                rest = &after[consumed..];
            }
            None => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Escapes text for an element's content.
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shaped like AWS's ListObjectsV2 example response.
    const LIST: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
    <Name>bucket</Name>
    <Prefix/>
    <KeyCount>2</KeyCount>
    <MaxKeys>1000</MaxKeys>
    <IsTruncated>true</IsTruncated>
    <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=&amp;x</NextContinuationToken>
    <Contents>
        <Key>my-image.jpg</Key>
        <LastModified>2009-10-12T17:50:30.000Z</LastModified>
        <ETag>&quot;fba9dede5f27731c9771645a39863328&quot;</ETag>
        <Size>434234</Size>
        <StorageClass>STANDARD</StorageClass>
    </Contents>
    <Contents>
        <Key>my-third-image.jpg</Key>
        <Size>64994</Size>
    </Contents>
</ListBucketResult>"#;

    #[test]
    fn reads_a_list_page() {
        let contents = elements(LIST, "Contents");
        assert_eq!(contents.len(), 2);
        assert_eq!(first(contents[0], "Key").as_deref(), Some("my-image.jpg"));
        assert_eq!(first(contents[1], "Size").as_deref(), Some("64994"));
        assert_eq!(
            first(contents[0], "ETag").as_deref(),
            Some("\"fba9dede5f27731c9771645a39863328\"")
        );
        assert_eq!(first(LIST, "IsTruncated").as_deref(), Some("true"));
        assert_eq!(
            first(LIST, "NextContinuationToken").as_deref(),
            Some("1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=&x")
        );
        assert_eq!(first(LIST, "Prefix").as_deref(), Some(""));
        assert_eq!(first(LIST, "ContinuationToken"), None);
        // <KeyCount> is not <Key>.
        assert_eq!(elements(LIST, "Key").len(), 2);
    }

    #[test]
    fn reads_an_error() {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchKey</Code>\
                   <Message>The resource you requested does not exist</Message>\
                   <Resource>/mybucket/myfoto.jpg</Resource></Error>";
        assert_eq!(first(xml, "Code").as_deref(), Some("NoSuchKey"));
        assert_eq!(
            first(xml, "Message").as_deref(),
            Some("The resource you requested does not exist")
        );
    }

    #[test]
    fn entities() {
        assert_eq!(
            unescape("a &lt;b&gt; &amp;&amp; &#65;&#x42;&apos;&quot;"),
            "a <b> && AB'\""
        );
        assert_eq!(
            unescape("odd & ends &bogus; &#xZZ;"),
            "odd & ends &bogus; &#xZZ;"
        );
        assert_eq!(escape("\"a\" <&>"), "\"a\" &lt;&amp;&gt;");
        assert_eq!(unescape(&escape("x<&>y")), "x<&>y");
    }

    #[test]
    fn unterminated_elements_are_ignored() {
        assert!(elements("<Key>a", "Key").is_empty());
        assert_eq!(elements("<Key/><Key>b</Key>", "Key"), vec!["", "b"]);
    }
}
