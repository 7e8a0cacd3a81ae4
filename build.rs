//! Stamps the build with its git commit (`im_relay_build_info{git_sha}`): from the
//! `IM_RELAY_GIT_SHA` environment variable (the Docker build passes it), else from git, else
//! "unknown".

use std::process::Command;

fn main() {
    let sha = std::env::var("IM_RELAY_GIT_SHA")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=IM_RELAY_GIT_SHA={sha}");
    println!("cargo:rerun-if-env-changed=IM_RELAY_GIT_SHA");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
