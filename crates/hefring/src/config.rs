//! Settings from a TOML file, below flags and `HEFRING_*` variables in precedence.
//!
//! The file is read before the command line is parsed, and each of its keys that is not
//! already set in the environment becomes the matching `HEFRING_*` variable: so every flag
//! can be set in the file without listing flags twice.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The configuration file named by `--config`/`HEFRING_CONFIG`, or `DATA_DIR/hefring.toml`.
fn config_path(args: &[String]) -> (PathBuf, bool) {
    let flag = |name: &str| {
        args.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix(&format!("--{name}="))
                .map(str::to_string)
                .or_else(|| {
                    (a == &format!("--{name}"))
                        .then(|| args.get(i + 1).cloned())
                        .flatten()
                })
        })
    };
    if let Some(path) = flag("config").or_else(|| std::env::var("HEFRING_CONFIG").ok()) {
        return (PathBuf::from(path), true);
    }
    let data_dir = flag("data-dir")
        .or_else(|| std::env::var("HEFRING_DATA_DIR").ok())
        .unwrap_or_else(|| "./hefring-data".into());
    (Path::new(&data_dir).join("hefring.toml"), false)
}

/// The `HEFRING_*` variables the file sets, for keys the environment does not set already.
pub fn variables_from_file(args: &[String]) -> Result<Vec<(String, String)>> {
    let (path, explicit) = config_path(args);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut vars = Vec::new();
    for (key, value) in table {
        let name = format!("HEFRING_{}", key.replace('-', "_").to_ascii_uppercase());
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => bail!(
                "{}: {key} must be a string, number or boolean, not {}",
                path.display(),
                other.type_str()
            ),
        };
        if std::env::var_os(&name).is_none() {
            vars.push((name, value));
        }
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_becomes_variables_for_keys_not_already_set() {
        let dir = std::env::temp_dir().join(format!("hefring-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("h.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9999\"\ntask-timeout = 60\nworkers = 2\n",
        )
        .unwrap();
        let args = vec![
            "hefring".into(),
            "serve".into(),
            format!("--config={}", file.display()),
        ];
        let mut vars = variables_from_file(&args).unwrap();
        vars.sort();
        assert!(vars.contains(&("HEFRING_LISTEN".into(), "127.0.0.1:9999".into())));
        assert!(vars.contains(&("HEFRING_TASK_TIMEOUT".into(), "60".into())));
        std::fs::write(&file, "listen = [1]").unwrap();
        assert!(variables_from_file(&args).is_err());
        let missing = vec![
            "hefring".into(),
            "--config".into(),
            dir.join("nope.toml").display().to_string(),
        ];
        assert!(variables_from_file(&missing).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
