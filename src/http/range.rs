//! `Range` requests on object downloads (RFC 9110 § 14): which bytes to send, or why the
//! whole object (or a 416) is the answer.

use std::ops::Range;

/// The most ranges one request may ask for before the header is ignored (RFC 9110 lets a
/// server ignore many small ranges; they cost a backend read each).
pub const MAX_RANGES: usize = 16;

#[derive(Debug, PartialEq, Eq)]
pub enum RangePlan {
    /// Send everything with 200 (no Range, an invalid or unsupported one, or one this
    /// server chooses to ignore).
    Full,
    /// 206 with these ranges (`start..end`, end exclusive), in the order asked.
    Partial(Vec<Range<u64>>),
    /// 416: no range overlaps the object.
    Unsatisfiable,
}

/// Plans the answer to `header` (the `Range` value) for an object of `size` bytes.
pub fn plan(header: Option<&str>, size: u64) -> RangePlan {
    let Some(header) = header else {
        return RangePlan::Full;
    };
    let Some(specs) = parse(header) else {
        return RangePlan::Full;
    };
    if specs.len() > MAX_RANGES || size == 0 {
        return RangePlan::Full;
    }
    let mut ranges = Vec::new();
    for spec in specs {
        let range = match spec {
            Spec::From(first, last) => {
                if first >= size {
                    continue;
                }
                first..last.map_or(size, |l| l.saturating_add(1).min(size))
            }
            Spec::Suffix(0) => continue,
            Spec::Suffix(n) => size.saturating_sub(n)..size,
        };
        ranges.push(range);
    }
    if ranges.is_empty() {
        return RangePlan::Unsatisfiable;
    }
    // Overlapping ranges would send the same bytes twice: RFC 9110 lets a server ignore
    // such a header, which is what happens here.
    let mut sorted = ranges.clone();
    sorted.sort_by_key(|r| r.start);
    if sorted.windows(2).any(|w| w[1].start < w[0].end) {
        return RangePlan::Full;
    }
    RangePlan::Partial(ranges)
}

enum Spec {
    /// `first-` or `first-last`.
    From(u64, Option<u64>),
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// `bytes=a-b, c-, -n`; `None` when it is not valid byte-range syntax.
fn parse(header: &str) -> Option<Vec<Spec>> {
    let (unit, set) = header.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let digits = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let mut specs = Vec::new();
    for part in set.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (first, last) = part.split_once('-')?;
        if first.trim().is_empty() {
            specs.push(Spec::Suffix(digits(last)?));
        } else {
            let first = digits(first)?;
            let last = if last.trim().is_empty() {
                None
            } else {
                Some(digits(last)?)
            };
            if last.is_some_and(|l| l < first) {
                return None;
            }
            specs.push(Spec::From(first, last));
        }
    }
    if specs.is_empty() {
        return None;
    }
    Some(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn ranges_follow_rfc_9110() {
        use RangePlan::*;
        assert_eq!(plan(None, 10), Full);
        assert_eq!(plan(Some("bytes=0-4"), 10), Partial(vec![0..5]));
        assert_eq!(plan(Some("bytes=5-"), 10), Partial(vec![5..10]));
        assert_eq!(plan(Some("bytes=-3"), 10), Partial(vec![7..10]));
        assert_eq!(plan(Some("bytes=-30"), 10), Partial(vec![0..10]));
        assert_eq!(plan(Some("bytes=8-100"), 10), Partial(vec![8..10]));
        assert_eq!(
            plan(Some("BYTES = 0-0 , 9-9"), 10),
            Partial(vec![0..1, 9..10])
        );
        assert_eq!(plan(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(plan(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(plan(Some("bytes=20-30, 40-"), 10), Unsatisfiable);
        // An unsatisfiable range next to a good one is dropped.
        assert_eq!(plan(Some("bytes=20-30, 0-1"), 10), Partial(vec![0..2]));
        // Invalid syntax, other units, reversed ranges: ignored.
        for bad in [
            "bytes=5-1",
            "items=0-1",
            "bytes=a-b",
            "bytes=",
            "bytes=1",
            "bytes=--1",
            "0-1",
            "bytes=1-2-3",
        ] {
            assert_eq!(plan(Some(bad), 10), Full, "{bad}");
        }
        // Overlapping and too many: ignored.
        assert_eq!(plan(Some("bytes=0-5, 3-8"), 10), Full);
        let many = (0..17)
            .map(|i| format!("{i}-{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(plan(Some(&format!("bytes={many}")), 100), Full);
        assert_eq!(plan(Some("bytes=0-1"), 0), Full);
        assert_eq!(plan(Some("bytes=99999999999999999999-"), 10), Full);
    }
}
