//! The image operands of qemu-img's commands: a file name, a `json:{...}`
//! file name, or with `--image-opts` an option string
//! (`driver=qcow2,file.filename=F,encrypt.key-secret=ID`), and the
//! `--object` definitions (secrets) such options refer to.

use crate::Fail;
use qcow2_ops::OpenOptions;
use std::path::{Path, PathBuf};

/// `--object` and `--image-opts`, shared by the commands that take them.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct SpecArgs {
    /// Object definitions (`secret,id=ID,data=...`, for `encrypt.key-secret`).
    #[arg(long = "object", action = clap::ArgAction::Append)]
    pub object: Vec<String>,
    /// The image operands are option strings
    /// (`driver=qcow2,file.filename=FILE,encrypt.key-secret=ID`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
}

/// An image operand, resolved.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The file.
    pub path: PathBuf,
    /// Its format when the options name one (`driver=`).
    pub fmt: Option<String>,
}

impl SpecArgs {
    /// Defines the `--object`s (once per process).
    pub fn define(&self) -> Result<(), Fail> {
        for o in &self.object {
            crate::secrets::define(o).map_err(Fail::new)?;
        }
        Ok(())
    }

    /// Resolves `operand` (with `-f` `fmt`): the file, its format, and the
    /// options it sets in `opts` (the key of an encrypted image).
    pub fn resolve(
        &self,
        operand: &Path,
        fmt: Option<&str>,
        opts: &mut OpenOptions,
    ) -> Result<Spec, Fail> {
        let s = operand.to_string_lossy();
        let pairs = if self.image_opts {
            if fmt.is_some() {
                return Err(Fail::new(
                    "--image-opts and --format are mutually exclusive",
                ));
            }
            crate::io::parse_opt_string(&s, None).map_err(Fail::new)?
        } else if let Some(j) = s.strip_prefix("json:") {
            qcow2_ops::json_options(j).map_err(Fail::new)?
        } else {
            return Ok(Spec {
                path: operand.to_path_buf(),
                fmt: fmt.map(str::to_string),
            });
        };
        let mut path = None;
        let mut driver = fmt.map(str::to_string);
        for (k, v) in pairs {
            match k.as_str() {
                "driver" => driver = Some(v),
                "file.filename" | "filename" | "file" => path = Some(v),
                "file.driver" if v == "file" => {}
                "file.driver" => return Err(Fail::new(format!("Unknown protocol '{v}'"))),
                "encrypt.key-secret" => {
                    opts.key_secret = Some(crate::secrets::lookup(&v).map_err(Fail::new)?)
                }
                "data-file.filename" => opts.data_file = Some(PathBuf::from(&v)),
                "data-file.driver" if v == "file" => {}
                "backing.encrypt.key-secret" => {
                    opts.backing_key_secret = Some(crate::secrets::lookup(&v).map_err(Fail::new)?)
                }
                "encrypt.format" if v == "luks" || v == "aes" => {}
                // The backing file is the one the header names (as the
                // qemu-io side does, the override is not followed).
                "backing.driver" | "backing.file.driver" | "backing.file.filename" => {}
                "read-only" | "force-share" | "discard" | "detect-zeroes" => {}
                _ if k.starts_with("cache.") || k.starts_with("file.") => {}
                _ => {
                    return Err(Fail::new(format!(
                        "Block format '{}' does not support the option '{k}'",
                        driver.as_deref().unwrap_or("qcow2")
                    )))
                }
            }
        }
        let Some(path) = path else {
            return Err(Fail::new(
                "A block device must be specified for \"filename\"",
            ));
        };
        let path = PathBuf::from(path.strip_prefix("file:").unwrap_or(&path));
        Ok(Spec { path, fmt: driver })
    }
}
