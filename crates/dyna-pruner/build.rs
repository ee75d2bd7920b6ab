//! Records the git commit of the sources being compiled (with `-dirty` when they differ from it),
//! so that checkpoints name the code that actually trained them.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    for path in ["../../.git/HEAD", "../../.git/index", "../../.git/refs", "../../crates", "../../Cargo.lock"] {
        println!("cargo:rerun-if-changed={path}");
    }
    let commit = match git(&["rev-parse", "HEAD"]) {
        Some(head) => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "../../crates",
                "../../Cargo.toml",
                "../../Cargo.lock",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{head}-dirty")
            } else {
                head
            }
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=DYNA_PRUNER_COMMIT={commit}");
}
