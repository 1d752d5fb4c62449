//! Campaign recipient uploads (CSV and JSON): any body is answered (a 400 or per-row
//! results), and every data record of an accepted CSV is either accepted or rejected with a
//! line number inside the file.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use voicectl::calls::campaigns::import;

fuzz_target!(|body: &[u8]| {
    let mut accepted = 0usize;
    if let Ok(Ok(rejected)) = import::csv(body, &BTreeSet::new(), 4, |batch| {
        accepted += batch.len();
        Ok(())
    }) {
        let lines = body.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        for r in &rejected {
            assert!(r.row <= lines, "row {} past the file's {lines} lines", r.row);
        }
        assert!(
            rejected.windows(2).all(|w| w[0].row <= w[1].row),
            "rows out of order: {rejected:?}"
        );
    }
    let _ = import::json(body, &BTreeSet::new());
});
