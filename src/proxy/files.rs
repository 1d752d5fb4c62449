//! A static site from `root`: `index.html` for directories, SPA fallback, content types,
//! validators (`ETag`, `Last-Modified`) with 304s, HEAD, and no way out of the root.
//!
//! The SPA rule: a GET or HEAD for a path that names no existing file and whose last segment
//! has no extension (`/dashboard/42`, not `/app.js`) is answered with the root's
//! `index.html`, so client-side routes survive a reload while a missing asset stays a 404.
//!
//! Kept by hand rather than tower-http's `ServeDir`/`ServeFile` (0.6): they compute no ETag
//! and answer no `If-None-Match`, follow symlinks out of the root, serve dot files, and have
//! no "index.html only for extension-less paths" fallback — each of those would stay here as
//! a wrapper, and the file would be resolved twice per request, for ~100 lines saved.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use percent_encoding::percent_decode_str;
use tokio_util::io::ReaderStream;

use super::ProxyError;

pub(super) async fn serve(root: &Path, rest: &str, req: Request) -> Result<Response, ProxyError> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return Err(ProxyError::MethodNotAllowed("GET, HEAD")),
    };
    let segments = decode_segments(rest)?;
    // All the file-system work in one blocking hop rather than one per call.
    let is_dir_url = req.uri().path().ends_with('/');
    let root = root.to_path_buf();
    let found = tokio::task::spawn_blocking(move || locate(&root, &segments, is_dir_url))
        .await
        .map_err(|_| ProxyError::NotFound)??;
    let (file, meta) = match found {
        Found::File(file, meta) => (file, meta),
        Found::DirectoryWithoutSlash => {
            // Relative links in the directory's index.html resolve against the URL, so
            // it must end in `/` (as nginx and every static server do).
            let mut to = format!("{}/", req.uri().path());
            if let Some(q) = req.uri().query() {
                to.push('?');
                to.push_str(q);
            }
            return redirect(&to);
        }
    };
    let validators = Validators::of(&meta);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&file)),
    );
    if let Some(etag) = &validators.etag {
        headers.insert(header::ETAG, etag.clone());
    }
    if let Some(lm) = &validators.last_modified {
        headers.insert(header::LAST_MODIFIED, lm.clone());
    }
    let mut resp = if validators.not_modified(req.headers()) {
        headers.remove(header::CONTENT_TYPE);
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.len()));
        let body = if head {
            Body::empty()
        } else {
            Body::from_stream(ReaderStream::with_capacity(file.handle, 64 * 1024))
        };
        Response::new(body)
    };
    resp.headers_mut().extend(headers);
    Ok(resp)
}

/// The request path below the route as file-name segments. Anything that could name a file
/// outside the root, or that a file system might read differently than we do, is refused:
/// `..`, encoded `/` or `\`, backslashes, NUL. Dot files (`.env`, `.git`) are not served,
/// except `/.well-known/`.
pub(super) fn decode_segments(rest: &str) -> Result<Vec<String>, ProxyError> {
    const BAD: ProxyError = ProxyError::BadRequest("invalid path");
    let mut out = Vec::new();
    for raw in rest.split('/').filter(|s| !s.is_empty()) {
        let seg = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| BAD)?
            .into_owned();
        if seg.contains(['/', '\\', '\0']) || seg == "." || seg == ".." {
            return Err(BAD);
        }
        if seg.starts_with('.') && !(out.is_empty() && seg == ".well-known") {
            return Err(ProxyError::NotFound);
        }
        out.push(seg);
    }
    Ok(out)
}

struct Opened {
    handle: tokio::fs::File,
    path: PathBuf,
}

impl std::ops::Deref for Opened {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

// Built once per request and moved once: boxing the big variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Found {
    File(Opened, std::fs::Metadata),
    DirectoryWithoutSlash,
}

/// Blocking: finds what `segments` name below `root` (a file, a directory's `index.html`, or
/// the SPA fallback) and opens it.
fn locate(root: &Path, segments: &[String], is_dir_url: bool) -> Result<Found, ProxyError> {
    let mut path = root.to_path_buf();
    path.extend(segments);
    let file = match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() && !is_dir_url => return Ok(Found::DirectoryWithoutSlash),
        Ok(meta) if meta.is_dir() => path.join("index.html"),
        Ok(_) => path,
        Err(_) if segments.last().is_none_or(|s| !s.contains('.')) => root.join("index.html"),
        Err(_) => return Err(ProxyError::NotFound),
    };
    let (file, meta) = open_inside(root, &file)?;
    Ok(Found::File(file, meta))
}

/// Opens `path` only if, with every symlink resolved, it is a regular file inside `root`.
/// The root is resolved per request too, so a symlinked root swapped by a deploy is followed.
fn open_inside(root: &Path, path: &Path) -> Result<(Opened, std::fs::Metadata), ProxyError> {
    let real = std::fs::canonicalize(path).map_err(|_| ProxyError::NotFound)?;
    let root = std::fs::canonicalize(root).map_err(|_| ProxyError::NotFound)?;
    if !real.starts_with(&root) {
        tracing::warn!(path = %path.display(), "static file resolves outside the root; refused");
        return Err(ProxyError::NotFound);
    }
    let handle = std::fs::File::open(&real).map_err(|_| ProxyError::NotFound)?;
    let meta = handle.metadata().map_err(|_| ProxyError::NotFound)?;
    if !meta.is_file() {
        return Err(ProxyError::NotFound);
    }
    Ok((
        Opened {
            handle: tokio::fs::File::from_std(handle),
            path: real,
        },
        meta,
    ))
}

struct Validators {
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
    mtime: Option<SystemTime>,
}

impl Validators {
    /// A weak ETag from size and modification time: changes whenever a deploy rewrites the
    /// file, costs no read of its content.
    fn of(meta: &std::fs::Metadata) -> Validators {
        let mtime = meta.modified().ok();
        let etag = mtime
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .and_then(|d| {
                HeaderValue::from_str(&format!("W/\"{:x}-{:x}\"", meta.len(), d.as_nanos())).ok()
            });
        let last_modified =
            mtime.and_then(|t| HeaderValue::from_str(&httpdate::fmt_http_date(t)).ok());
        Validators {
            etag,
            last_modified,
            mtime,
        }
    }

    /// RFC 9110 §13.2.2: `If-None-Match` decides when present (weak comparison);
    /// `If-Modified-Since` only otherwise.
    fn not_modified(&self, h: &HeaderMap) -> bool {
        if h.contains_key(header::IF_NONE_MATCH) {
            let Some(etag) = &self.etag else {
                return false;
            };
            let ours = weak_tag(etag.as_bytes());
            return h
                .get_all(header::IF_NONE_MATCH)
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b','))
                .map(|t| t.trim_ascii())
                .any(|t| t == b"*" || weak_tag(t) == ours);
        }
        let since = h
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        match (since, self.mtime) {
            // HTTP dates have whole seconds; a file modified within the same second counts
            // as not modified.
            (Some(since), Some(mtime)) => mtime
                .duration_since(since)
                .map_or(true, |d| d.as_secs() == 0),
            _ => false,
        }
    }
}

fn weak_tag(t: &[u8]) -> &[u8] {
    t.strip_prefix(b"W/").unwrap_or(t)
}

fn redirect(to: &str) -> Result<Response, ProxyError> {
    let loc = HeaderValue::from_str(to).map_err(|_| ProxyError::BadRequest("invalid path"))?;
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
    r.headers_mut().insert(header::LOCATION, loc);
    Ok(r)
}

/// The common web types; anything else is `application/octet-stream`.
fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("webmanifest") => "application/manifest+json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("md") => "text/markdown; charset=utf-8",
        Some("csv") => "text/csv; charset=utf-8",
        Some("xml") => "application/xml",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("avif") => "image/avif",
        Some("ico") => "image/x-icon",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("ttf") => "font/ttf",
        Some("otf") => "font/otf",
        Some("wasm") => "application/wasm",
        Some("pdf") => "application/pdf",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("mp3") => "audio/mpeg",
        Some("ogg") => "audio/ogg",
        Some("wav") => "audio/wav",
        Some("zip") => "application/zip",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_spellings_are_refused() {
        for p in [
            "/a/%2e%2e/b",
            "/..",
            "/a%2fb",
            "/a%5cb",
            "/a\\b",
            "/a%00b",
            "/%ff",
        ] {
            assert!(
                matches!(decode_segments(p), Err(ProxyError::BadRequest(_))),
                "{p}"
            );
        }
        assert!(matches!(
            decode_segments("/.env"),
            Err(ProxyError::NotFound)
        ));
        assert_eq!(
            decode_segments("/.well-known/a%20b//c").unwrap(),
            [".well-known", "a b", "c"]
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(
            content_type(Path::new("a/INDEX.HTML")),
            "text/html; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("a.js")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("a.bin")), "application/octet-stream");
        assert_eq!(content_type(Path::new("noext")), "application/octet-stream");
    }
}

/// Property tests (issue 11): no request path names a file outside the static root.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use std::path::Component;

    fn tricky_rest() -> impl Strategy<Value = String> {
        let seg = prop_oneof![
            Just("..".to_owned()),
            Just("%2e%2e".to_owned()),
            Just("%2E%2e".to_owned()),
            Just("%2f".to_owned()),
            Just("%5C".to_owned()),
            Just("%00".to_owned()),
            Just(".git".to_owned()),
            Just(".well-known".to_owned()),
            Just("%ff".to_owned()),
            "[a-z.%2eEf5c\\\\]{0,6}",
            "\\PC{0,6}",
        ];
        proptest::collection::vec(seg, 0..6).prop_map(|segs| format!("/{}", segs.join("/")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decoded_segments_never_leave_the_root(rest in tricky_rest()) {
            let root = Path::new("/srv/site");
            if let Ok(segments) = decode_segments(&rest) {
                let mut path = root.to_path_buf();
                path.extend(&segments);
                prop_assert!(path.starts_with(root), "{} -> {}", rest, path.display());
                for c in path.strip_prefix(root).expect("checked").components() {
                    prop_assert!(matches!(c, Component::Normal(_)), "{} -> {:?}", rest, c);
                }
                prop_assert_eq!(path.components().count(), root.components().count() + segments.len());
                for (i, s) in segments.iter().enumerate() {
                    prop_assert!(!s.is_empty() && !s.contains(['/', '\\', '\0']));
                    prop_assert!(!s.starts_with('.') || (i == 0 && s == ".well-known"));
                }
            }
        }

        #[test]
        fn arbitrary_rests_never_panic(rest in "\\PC{0,80}") {
            let _ = decode_segments(&rest);
        }

        #[test]
        fn validators_never_panic_on_request_headers(
            inm in proptest::option::of("[ -~]{0,40}"),
            ims in proptest::option::of("[ -~]{0,40}"),
        ) {
            let dir = std::env::temp_dir();
            let meta = std::fs::metadata(&dir).expect("temp dir exists");
            let v = Validators::of(&meta);
            let mut h = HeaderMap::new();
            if let Some(Ok(x)) = inm.as_deref().map(HeaderValue::from_str) {
                h.insert(header::IF_NONE_MATCH, x);
            }
            if let Some(Ok(x)) = ims.as_deref().map(HeaderValue::from_str) {
                h.insert(header::IF_MODIFIED_SINCE, x);
            }
            let _ = v.not_modified(&h);
            // Our own validator always matches itself.
            if let Some(etag) = &v.etag {
                let mut own = HeaderMap::new();
                own.insert(header::IF_NONE_MATCH, etag.clone());
                prop_assert!(v.not_modified(&own));
            }
        }
    }
}
