//! `synthesis doctor` with the scripted fake claude (the real-CLI cases are in real_claude.rs).

mod support;

use std::path::Path;

use serde_json::json;
use support::daemon::{doctor, fake_claude};

#[test]
fn doctor_says_when_claude_is_missing() {
    let out = doctor("missing", Path::new("/nonexistent/claude"), None, &[]);
    assert!(!out.status.success());
    assert!(support::daemon::report(&out).contains("FIX   claude not found"));
}

#[test]
fn doctor_says_when_the_workspace_is_not_trusted() {
    let seed = json!({"oauthAccount": {"emailAddress": "x@example.com"}, "projects": {}});
    let out = doctor("untrusted", &fake_claude(), Some(seed), &[]);
    assert!(!out.status.success());
    let text = support::daemon::report(&out);
    assert!(text.contains("is not trusted: run `claude` there once"), "{text}");
    assert!(text.contains("ok    claude registered the synthesis channel"), "the other checks still run: {text}");
}

#[test]
fn doctor_says_when_nobody_is_logged_in() {
    let seed = json!({"projects": "WS"});
    let out = doctor("nologin", &fake_claude(), Some(seed), &[]);
    assert!(!out.status.success());
    assert!(support::daemon::report(&out).contains("FIX   not logged in"));
}

#[test]
fn doctor_passes_when_everything_works() {
    let seed = json!({"oauthAccount": {"emailAddress": "x@example.com"}, "projects": "WS"});
    let out = doctor("fine", &fake_claude(), Some(seed), &[]);
    let text = support::daemon::report(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok    claude registered the synthesis channel"));
    assert!(!text.contains("FIX"));
}
