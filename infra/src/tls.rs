//! Certificates: the operator's, or a self-signed one made at first start.

use std::path::{Path, PathBuf};

/// Where the certificate and key in use are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificatePaths {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Whether this start generated them.
    pub generated: bool,
}

/// Errors while preparing certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate could not be generated.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Returns the configured certificate, or the self-signed one for `domains`
/// under `dir` (`cert.pem`, `key.pem` with mode 0600), generating it if absent.
pub fn ensure_certificate(
    configured: Option<(&Path, &Path)>,
    dir: &Path,
    domains: &[String],
) -> Result<CertificatePaths, TlsError> {
    if let Some((cert, key)) = configured {
        for path in [cert, key] {
            std::fs::metadata(path).map_err(|source| TlsError::Io {
                path: path.to_owned(),
                source,
            })?;
        }
        return Ok(CertificatePaths {
            cert: cert.to_owned(),
            key: key.to_owned(),
            generated: false,
        });
    }
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok(CertificatePaths {
            cert,
            key,
            generated: false,
        });
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut names: Vec<String> = domains.to_vec();
    for d in domains {
        // Group chat and upload services live on subdomains.
        names.push(format!("*.{d}"));
    }
    let generated = rcgen::generate_simple_self_signed(names)?;
    write_private(&key, generated.signing_key.serialize_pem().as_bytes()).map_err(io(&key))?;
    std::fs::write(&cert, generated.cert.pem()).map_err(io(&cert))?;
    Ok(CertificatePaths {
        cert,
        key,
        generated: true,
    })
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let domains = vec!["example.com".to_owned()];
        let first = ensure_certificate(None, dir.path(), &domains).unwrap();
        assert!(first.generated);
        let pem = std::fs::read_to_string(&first.cert).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&first.key).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let second = ensure_certificate(None, dir.path(), &domains).unwrap();
        assert!(!second.generated);
        assert_eq!(std::fs::read_to_string(&second.cert).unwrap(), pem);
    }

    #[test]
    fn missing_configured_file_is_named() {
        let err = ensure_certificate(
            Some((
                Path::new("/nonexistent/c.pem"),
                Path::new("/nonexistent/k.pem"),
            )),
            Path::new("/tmp"),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/c.pem"));
    }
}
