//! `--object secret,...` definitions, looked up by the `encrypt.key-secret`
//! options that open and create encrypted images (QEMU's secret objects:
//! `data=` or `file=`, `format=raw|base64`).

use base64::Engine;
use qcow2_ops::Secret;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

fn registry() -> std::sync::MutexGuard<'static, HashMap<String, Secret>> {
    static R: OnceLock<Mutex<HashMap<String, Secret>>> = OnceLock::new();
    R.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Defines the object `def` (`TYPE,id=ID,...`, the type may be given as
/// `qom-type=`). Secrets are kept for [`lookup`]; other object types are
/// checked for their id and accepted. Errors are QEMU's messages.
pub fn define(def: &str) -> Result<(), String> {
    let o = crate::io::parse_opt_string(def, Some("qom-type"))?;
    let get = |k: &str| o.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(ty) = get("qom-type") else {
        return Err("Parameter 'qom-type' is missing".into());
    };
    let Some(id) = get("id") else {
        return Err("Parameter 'id' is missing".into());
    };
    match ty.as_str() {
        "secret" => {}
        "iothread" | "throttle-group" | "tls-creds-x509" | "tls-creds-psk" | "tls-creds-anon"
        | "authz-simple" => return Ok(()),
        _ => return Err(format!("invalid object type: {ty}")),
    }
    for (k, _) in &o {
        if !matches!(k.as_str(), "qom-type" | "id" | "data" | "file" | "format") {
            return Err(format!("Property 'secret.{k}' not found"));
        }
    }
    let raw = match (get("data"), get("file")) {
        (Some(_), Some(_)) => return Err("'file' and 'data' are mutually exclusive".into()),
        (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => std::fs::read(&f).map_err(|e| {
            format!(
                "Unable to read {f}: Failed to open file \u{201c}{f}\u{201d}: {}",
                crate::strerror(e.raw_os_error().unwrap_or(5))
            )
        })?,
    };
    let bytes = match get("format").as_deref() {
        None | Some("raw") => raw,
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(raw.trim_ascii())
            .map_err(|_| "Base64 data contains invalid characters".to_string())?,
        Some(f) => return Err(format!("Parameter 'format' does not accept value '{f}'")),
    };
    let mut r = registry();
    if r.contains_key(&id) {
        return Err(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        ));
    }
    r.insert(id, Secret(bytes));
    Ok(())
}

/// The secret with id `id`.
pub fn lookup(id: &str) -> Result<Secret, String> {
    registry()
        .get(id)
        .cloned()
        .ok_or_else(|| format!("No secret with id '{id}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_from_data_base64_and_file() {
        define("secret,id=t1,data=astrochicken").unwrap();
        assert_eq!(lookup("t1").unwrap().0, b"astrochicken");
        define("secret,id=t2,format=base64,data=YXN0cm9jaGlja2Vu").unwrap();
        assert_eq!(lookup("t2").unwrap().0, b"astrochicken");
        assert_eq!(
            define("secret,id=t3,format=base64,data=!!!").unwrap_err(),
            "Base64 data contains invalid characters"
        );
        assert_eq!(
            define("secret,id=t4").unwrap_err(),
            "Either 'file' or 'data' must be provided"
        );
        assert!(define("secret,id=t1,data=x")
            .unwrap_err()
            .contains("duplicate property 't1'"));
        assert_eq!(lookup("nope").unwrap_err(), "No secret with id 'nope'");
        define("iothread,id=io0").unwrap();
    }
}
