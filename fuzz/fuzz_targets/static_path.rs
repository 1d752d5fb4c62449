//! The static site's path rules: the segments joined to the root never leave it.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use voicectl::proxy::fuzzing::static_segments;

fuzz_target!(|rest: &str| {
    let Some(segments) = static_segments(rest) else {
        return;
    };
    let root = Path::new("/srv/site");
    let mut path = root.to_path_buf();
    path.extend(&segments);
    let below = path.strip_prefix(root).expect("joined below the root");
    assert!(
        below
            .components()
            .all(|c| matches!(c, Component::Normal(_))),
        "{rest:?} -> {}",
        path.display()
    );
    assert_eq!(below.components().count(), segments.len(), "{rest:?}");
    for (i, s) in segments.iter().enumerate() {
        assert!(!s.contains(['/', '\\', '\0']), "{rest:?}");
        assert!(
            !s.starts_with('.') || (i == 0 && s == ".well-known"),
            "{rest:?}"
        );
    }
});
