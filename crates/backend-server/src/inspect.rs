//! What `target verify` finds on a server: the OS, the tools and the services.

use hefring_core::target::{Inspection, OPTIONAL_TOOLS, REQUIRED_TOOLS};

use crate::executor::CommandSpec;

/// A fixed script (no user input in it) that prints `key=value` lines.
const SCRIPT: &str = r#"
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
if [ -r /etc/os-release ]; then . /etc/os-release; echo "os=${PRETTY_NAME:-$NAME}"; else echo "os=$(uname -s)"; fi
echo "kernel=$(uname -srm)"
find_tool() {
  for candidate in "$@"; do
    found=$(command -v "$candidate" 2>/dev/null) && { echo "$found"; return; }
  done
}
for tool in TOOLS; do
  case "$tool" in
    php-fpm) path=$(find_tool php-fpm php-fpm8.4 php-fpm8.3 php-fpm8.2 php-fpm8.1 php-fpm8.0 php-fpm7.4) ;;
    mariadb) path=$(find_tool mariadb mysql) ;;
    mysqldump) path=$(find_tool mariadb-dump mysqldump) ;;
    *) path=$(find_tool "$tool") ;;
  esac
  echo "tool:$tool=$path"
done
if [ -S /run/mysqld/mysqld.sock ]; then echo "service:mariadb=up"; else echo "service:mariadb=down"; fi
if command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; then echo "service:postgresql=up"; else echo "service:postgresql=down"; fi
"#;

/// The command that inspects a server.
pub fn command() -> CommandSpec {
    let tools: Vec<&str> = REQUIRED_TOOLS
        .iter()
        .chain(OPTIONAL_TOOLS)
        .copied()
        .collect();
    CommandSpec::new(["sh", "-c", &SCRIPT.replace("TOOLS", &tools.join(" "))])
}

/// Reads the script's output.
pub fn parse(output: &str) -> Inspection {
    let mut found = Inspection::default();
    for line in output.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key == "os" {
            found.os = value.to_string();
        } else if key == "kernel" {
            found.kernel = value.to_string();
        } else if let Some(tool) = key.strip_prefix("tool:") {
            let path = (!value.is_empty()).then(|| value.to_string());
            found.tools.push((tool.to_string(), path));
        } else if let Some(service) = key.strip_prefix("service:") {
            found.services.push((service.to_string(), value == "up"));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::{Executor, LocalExecutor, Stream};
    use std::sync::Mutex;

    #[tokio::test]
    async fn inspecting_this_machine_finds_its_os_and_shell() {
        let out = Mutex::new(String::new());
        let sink = |s: Stream, l: String| {
            if s == Stream::Stdout {
                let mut o = out.lock().unwrap();
                o.push_str(&l);
                o.push('\n');
            }
        };
        let code = LocalExecutor.run(&command(), &sink).await.unwrap();
        assert_eq!(code, Some(0));
        let found = parse(&out.into_inner().unwrap());
        assert!(!found.os.is_empty());
        assert!(found.kernel.starts_with("Linux"), "{}", found.kernel);
        let sh = found.tools.iter().find(|(n, _)| n == "sh").unwrap();
        assert!(sh.1.as_deref().unwrap().ends_with("/sh"));
        assert_eq!(
            found.tools.len(),
            REQUIRED_TOOLS.len() + OPTIONAL_TOOLS.len()
        );
        assert!(found.services.iter().any(|(n, _)| n == "mariadb"));
    }

    #[test]
    fn parse_reads_missing_tools_as_none() {
        let found = parse(
            "os=Debian\nkernel=Linux 6\ntool:nginx=\ntool:sh=/bin/sh\nservice:mariadb=down\n",
        );
        assert_eq!(
            found.tools,
            [
                ("nginx".into(), None),
                ("sh".into(), Some("/bin/sh".into()))
            ]
        );
        assert_eq!(found.services, [("mariadb".into(), false)]);
    }
}
