//! Cache URLs: which object store, where, and how to show the URL without secrets.

use super::CacheError;

/// The URL forms vmrig accepts, for error messages.
pub const URL_FORMS: &str = "s3://BUCKET/PREFIX, file:///PATH, http(s)://HOST/PATH (read-only), \
                             gcs://BUCKET/PREFIX, azblob://CONTAINER/PREFIX or ghac://PREFIX";

/// A parsed cache URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheUrl {
    S3 {
        bucket: String,
        prefix: String,
    },
    File {
        path: String,
    },
    /// Read-only: a plain web server (or a bucket's public endpoint) serving the layout.
    Http {
        endpoint: String,
        prefix: String,
    },
    Gcs {
        bucket: String,
        prefix: String,
    },
    Azblob {
        container: String,
        prefix: String,
    },
    /// The GitHub Actions cache of the running workflow.
    Ghac {
        prefix: String,
    },
}

impl CacheUrl {
    pub fn parse(url: &str) -> Result<CacheUrl, CacheError> {
        let bad = |reason: &str| CacheError::BadUrl {
            url: redact(url),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("it has no scheme"))?;
        let bucket_and_prefix = |what: &str| -> Result<(String, String), CacheError> {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad(&format!("it names no {what}")));
            }
            if bucket.contains('@') {
                return Err(bad(
                    "credentials do not belong in the URL (use the provider's environment \
                     variables or configuration files)",
                ));
            }
            Ok((bucket.to_owned(), clean_prefix(prefix)))
        };
        match scheme {
            "s3" => {
                let (bucket, prefix) = bucket_and_prefix("bucket")?;
                Ok(CacheUrl::S3 { bucket, prefix })
            }
            "gcs" | "gs" => {
                let (bucket, prefix) = bucket_and_prefix("bucket")?;
                Ok(CacheUrl::Gcs { bucket, prefix })
            }
            "azblob" => {
                let (container, prefix) = bucket_and_prefix("container")?;
                Ok(CacheUrl::Azblob { container, prefix })
            }
            "ghac" => Ok(CacheUrl::Ghac {
                prefix: clean_prefix(rest),
            }),
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad("a file URL needs an absolute path (file:///PATH)"));
                }
                Ok(CacheUrl::File {
                    path: rest.to_owned(),
                })
            }
            "http" | "https" => {
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                if host.is_empty() {
                    return Err(bad("it names no host"));
                }
                Ok(CacheUrl::Http {
                    endpoint: format!("{scheme}://{host}"),
                    prefix: clean_prefix(path),
                })
            }
            _ => Err(bad(&format!("vmrig has no cache backend `{scheme}`"))),
        }
    }

    /// Whether vmrig may write through this backend at all.
    pub fn writable(&self) -> bool {
        !matches!(self, CacheUrl::Http { .. })
    }
}

fn clean_prefix(prefix: &str) -> String {
    prefix.trim_matches('/').to_owned()
}

/// `url` with any user information (`user:secret@`) and query (signed URLs, tokens)
/// replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some(split) => split,
        None => return url.to_owned(),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rfind('@') {
        Some(i) => format!("***@{}", &authority[i + 1..]),
        None => authority.to_owned(),
    };
    let path = match path.split_once('?') {
        Some((path, _)) => format!("{path}?***"),
        None => path.to_owned(),
    };
    format!("{scheme}://{authority}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            CacheUrl::parse("s3://ci-cache/vmrig/").unwrap(),
            CacheUrl::S3 {
                bucket: "ci-cache".into(),
                prefix: "vmrig".into()
            }
        );
        assert_eq!(
            CacheUrl::parse("s3://b").unwrap(),
            CacheUrl::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            CacheUrl::parse("file:///mnt/cache").unwrap(),
            CacheUrl::File {
                path: "/mnt/cache".into()
            }
        );
        assert_eq!(
            CacheUrl::parse("https://cache.example/x/y").unwrap(),
            CacheUrl::Http {
                endpoint: "https://cache.example".into(),
                prefix: "x/y".into()
            }
        );
        assert!(!CacheUrl::parse("http://h/").unwrap().writable());
    }

    #[test]
    fn bad_urls_say_why_and_never_show_secrets() {
        for (url, why) in [
            ("/mnt/cache", "no scheme"),
            ("s3:///prefix", "no bucket"),
            ("ftp://h/x", "no cache backend `ftp`"),
            ("file://relative", "absolute path"),
            ("s3://AKIA:secret@bucket/x", "credentials"),
        ] {
            let err = CacheUrl::parse(url).unwrap_err().to_string();
            assert!(err.contains(why), "{url}: {err}");
            assert!(!err.contains("secret"), "{err}");
            assert!(err.contains(URL_FORMS), "{err}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact("https://user:pw@host:8080/a/b?sig=x"),
            "https://***@host:8080/a/b?***"
        );
        assert_eq!(redact("s3://bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(redact("no scheme"), "no scheme");
    }
}
