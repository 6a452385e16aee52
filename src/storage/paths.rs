//! Object paths and content types as clients give them, checked before anything is read or
//! stored. A path is a `/`-separated list of segments; it is taken byte for byte (no case
//! folding or Unicode normalisation) and refused, not repaired, when it could mean something
//! else somewhere: `..`, `.`, empty segments (a leading, trailing or doubled `/`), NUL and
//! other control characters, `\`, over-long names, and a first segment starting with `_`
//! (reserved for `_sign` and `_uploads`).

use serde_json::json;

use crate::error::{ApiError, ApiResult};

/// The longest path, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// The longest segment, in bytes (what most filesystems allow for one name).
pub const MAX_SEGMENT_BYTES: usize = 255;

fn bad_path(why: &str) -> ApiError {
    ApiError::invalid_with(
        format!("invalid object path: {why}"),
        json!({"field": "path"}),
    )
}

/// Checks an object path (see the module comment).
pub fn check_path(path: &str) -> ApiResult<()> {
    if path.is_empty() {
        return Err(bad_path("it is empty"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(bad_path("it is longer than 1024 bytes"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(bad_path(
            "it contains a control character (NUL, newline, …)",
        ));
    }
    if path.contains('\\') {
        return Err(bad_path("it contains `\\`; use `/` between folders"));
    }
    for (i, segment) in path.split('/').enumerate() {
        if segment.is_empty() {
            return Err(bad_path(
                "it has an empty segment (leading, trailing or doubled `/`)",
            ));
        }
        if segment == "." || segment == ".." {
            return Err(bad_path("`.` and `..` segments are not allowed"));
        }
        if segment.len() > MAX_SEGMENT_BYTES {
            return Err(bad_path("a segment is longer than 255 bytes"));
        }
        if i == 0 && segment.starts_with('_') {
            return Err(bad_path(
                "the first segment may not start with `_` (reserved)",
            ));
        }
    }
    Ok(())
}

/// Checks a listing prefix: like a path, but it may be empty and may end with `/` or in the
/// middle of a segment.
pub fn check_prefix(prefix: &str) -> ApiResult<()> {
    let bad = |why: &str| {
        ApiError::invalid_with(format!("invalid prefix: {why}"), json!({"field": "prefix"}))
    };
    if prefix.len() > MAX_PATH_BYTES {
        return Err(bad("it is longer than 1024 bytes"));
    }
    if prefix.chars().any(|c| c.is_control()) {
        return Err(bad("it contains a control character"));
    }
    Ok(())
}

/// The smallest string greater than every string that starts with `prefix` (`None` when
/// there is none, or `prefix` is empty): the exclusive upper bound of a prefix scan in
/// bytewise order.
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        // Skip the surrogate gap, which has no chars.
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Checks a `Content-Type` value loosely (`type/subtype` with optional parameters) and
/// answers it lower-cased without parameters' surrounding spaces; `None` for the default.
pub fn content_type(raw: Option<&str>) -> ApiResult<String> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok("application/octet-stream".to_string());
    };
    let essence = raw.split(';').next().unwrap_or_default().trim();
    let valid_token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    let ok = raw.len() <= 255
        && raw.bytes().all(|b| (0x20..0x7f).contains(&b))
        && essence
            .split_once('/')
            .is_some_and(|(t, s)| valid_token(t) && valid_token(s));
    if !ok {
        return Err(ApiError::invalid_with(
            "Content-Type must be a media type such as image/png",
            json!({"header": "content-type"}),
        ));
    }
    Ok(raw.to_ascii_lowercase())
}

/// Whether `content_type` matches one of `patterns` (`image/png`, `image/*`, `*/*`);
/// an empty list allows every type.
pub fn type_allowed(content_type: &str, patterns: &[String]) -> bool {
    if patterns.is_empty() {
        return true;
    }
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let (t, _) = essence.split_once('/').unwrap_or((essence, ""));
    patterns.iter().any(|p| {
        let p = p.to_ascii_lowercase();
        p == "*/*" || p == essence || p.strip_suffix("/*").is_some_and(|prefix| prefix == t)
    })
}

/// Checks a bucket's `allowed_content_types` pattern: `type/subtype`, `type/*` or `*/*`.
pub fn valid_type_pattern(p: &str) -> bool {
    p == "*/*"
        || p.strip_suffix("/*")
            .map(|t| content_type(Some(&format!("{t}/x"))).is_ok())
            .unwrap_or_else(|| content_type(Some(p)).is_ok() && !p.contains(';'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused() {
        for ok in ["a", "users/u1/me.png", "ünïcode/文件.txt", "a b/c"] {
            assert!(check_path(ok).is_ok(), "{ok:?}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "../a",
            "a/../b",
            "a/./b",
            ".",
            "..",
            "a\0b",
            "a\nb",
            "a\\b",
            "_sign",
            "_uploads/x",
            &long,
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_path(&format!("{}c", "ab/".repeat(400))).is_err());
        assert!(check_path("a/_b").is_ok());
    }

    #[test]
    fn prefix_ends_bound_every_extension() {
        assert_eq!(prefix_end("photos/").as_deref(), Some("photos0"));
        assert_eq!(prefix_end("a"), Some("b".into()));
        assert_eq!(prefix_end(""), None);
        let end = prefix_end("x\u{10FFFF}").unwrap();
        assert_eq!(end, "y");
        let p = "dir/\u{D7FF}";
        let end = prefix_end(p).unwrap();
        assert!(format!("{p}\u{10FFFF}zz").as_str() < end.as_str());
    }

    #[test]
    fn content_types_and_patterns() {
        assert_eq!(content_type(None).unwrap(), "application/octet-stream");
        assert_eq!(content_type(Some("Image/PNG")).unwrap(), "image/png");
        assert!(content_type(Some("text/plain; charset=utf-8")).is_ok());
        for bad in ["png", "image/", "/png", "a/b\r\nx: y", "ä/b"] {
            assert!(content_type(Some(bad)).is_err(), "{bad:?}");
        }
        let pats = vec!["image/*".to_string(), "application/pdf".to_string()];
        assert!(type_allowed("image/png", &pats));
        assert!(type_allowed("application/pdf", &pats));
        assert!(!type_allowed("text/html", &pats));
        assert!(!type_allowed("imagex/png", &pats));
        assert!(type_allowed("text/html", &[]));
        assert!(valid_type_pattern("image/*") && valid_type_pattern("*/*"));
        assert!(!valid_type_pattern("image") && !valid_type_pattern("*/png"));
    }
}
