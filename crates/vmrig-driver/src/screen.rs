//! The screen: keys, screenshots' text (OCR), X11 windows, image matching.
//! (Dispatched from `rpc.rs` with the typed [`MachineRequest`]; `screenshot` itself is in
//! `rpc.rs`.)
//!
//! NixOS semantics (nixos/lib/test-driver, machine/__init__.py and ocr.py), with these
//! differences:
//! - Keys go through QMP `send-key` instead of HMP `sendkey`, with the same names; a name
//!   QEMU does not know is an error (upstream ignores the monitor's complaint).
//! - OCR preprocessing is done in Rust (no ImageMagick): besides the raw screen, a
//!   grayscale upscaled, an inverted and a thresholded variant ([`imaging::variants`]).
//!   `wait_for_text` stops at the first variant that matches, and every attempt, OCR
//!   processes included, ends by the wait's deadline.
//! - `wait_for_x` waits for the X socket and, when `xwininfo` is there, for a client to
//!   connect (Debian has no NixOS "Current graphical" target to watch in the journal).
//! - X clients run with `DISPLAY=:0` unless the guest shell sets `DISPLAY`; while X is not up
//!   yet, `wait_for_window` keeps waiting (upstream fails on the first `xwininfo` error).
//! - Beyond NixOS: `wait_for_image(path, threshold, timeout)` and
//!   `screen_matches(path, threshold)` find a reference image anywhere on the screen
//!   ([`matching::best_match`]); a failed wait saves the last screen and the best score to
//!   the output directory.

pub mod imaging;
pub mod keys;
pub mod matching;
pub mod ocr;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::DynamicImage;
use regex::Regex;
use serde_json::{json, Value};
use vmrig_python::RpcError;

use crate::events::Level;
use crate::machine::Machine;
use crate::request::MachineRequest;
use crate::ApiError;
use crate::DEFAULT_WAIT;

/// Default threshold of `wait_for_image` and `screen_matches`.
pub const DEFAULT_THRESHOLD: f64 = 0.95;

/// Longest a single QMP command of this module may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The screen's calls (rpc.rs passes every other request elsewhere).
pub fn call(m: &mut Machine, call: MachineRequest) -> Result<Value, RpcError> {
    use MachineRequest as R;
    let timeout = |t: Option<f64>| t.unwrap_or(DEFAULT_WAIT);
    Ok(match call {
        R::SendKey { key, delay, log } => {
            send_key(m, &key, delay, log.unwrap_or(true))?;
            Value::Null
        }
        R::SendChars { chars, delay } => {
            send_chars(m, &chars, delay)?;
            Value::Null
        }
        R::GetScreenText {} => json!(get_screen_text(m)?),
        R::GetScreenTextVariants {} => json!(get_screen_text_variants(m)?),
        R::WaitForText { regex, timeout: t } => {
            wait_for_text(m, &regex, timeout(t))?;
            Value::Null
        }
        R::WaitForX { timeout: t } => {
            wait_for_x(m, timeout(t))?;
            Value::Null
        }
        R::GetWindowNames {} => json!(get_window_names(m)?),
        R::WaitForWindow { regexp, timeout: t } => {
            wait_for_window(m, &regexp, timeout(t))?;
            Value::Null
        }
        R::WaitForImage {
            path,
            threshold: th,
            timeout: t,
        } => {
            wait_for_image(m, &path, threshold(th)?, timeout(t))?;
            Value::Null
        }
        R::ScreenMatches {
            path,
            threshold: th,
        } => {
            json!(screen_matches(m, &path, threshold(th)?)?)
        }
        other => {
            return Err(RpcError::internal(format!(
                "vmrig driver: {other:?} is not a screen call"
            )))
        }
    })
}

/// A matching threshold: in (0, 1], default [`DEFAULT_THRESHOLD`].
fn threshold(given: Option<f64>) -> Result<f64, RpcError> {
    let t = given.unwrap_or(DEFAULT_THRESHOLD);
    if t > 0.0 && t <= 1.0 {
        Ok(t)
    } else {
        Err(RpcError::assertion(format!(
            "threshold must be in (0, 1], not {t}"
        )))
    }
}

fn machine_err(e: impl std::fmt::Display) -> ApiError {
    ApiError::Machine(e.to_string())
}

fn log(m: &Machine, message: impl Into<String>) {
    m.logger().log(Level::Info, message, Some(&m.name));
}

fn compile(regex: &str) -> Result<Regex, ApiError> {
    Regex::new(regex).map_err(|e| ApiError::Assertion(format!("invalid regex {regex:?}: {e}")))
}

fn short(text: &str, max: usize) -> String {
    let t = text.trim();
    if t.chars().count() <= max {
        t.to_owned()
    } else {
        format!("{}...", t.chars().take(max).collect::<String>())
    }
}

/// The machine's QMP client. QEMU connects QMP while the guest boots (vmrig-vm accepts it
/// with the shell), so a machine that is started but not yet connected is waited for.
fn qmp(
    m: &mut Machine,
) -> Result<&mut vmrig_vm::qmp::Qmp<std::os::unix::net::UnixStream>, ApiError> {
    if !m.is_booted() {
        return Err(ApiError::Machine(format!(
            "`{}` is not running (start it before using its screen or keyboard)",
            m.name
        )));
    }
    if !m.is_connected() {
        m.connect()?;
    }
    m.vm_mut()?.qmp().map_err(machine_err)
}

// -- keys

pub fn send_key(m: &mut Machine, key: &str, delay: Option<f64>, log: bool) -> Result<(), ApiError> {
    let keys = keys::qemu_keys(key).map_err(ApiError::Assertion)?;
    let name = m.name.clone();
    let logger = m.logger().clone();
    let mut press = || -> Result<(), ApiError> {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        qmp(m)?
            .send_key(&refs, None)
            .map_err(|e| ApiError::Machine(format!("send_key {key:?}: {e}")))?;
        if let Some(d) = delay.filter(|d| d.is_finite() && *d > 0.0) {
            std::thread::sleep(Duration::from_secs_f64(d.min(60.0)));
        }
        Ok(())
    };
    if log {
        logger.nested(
            format!("sending key {:?}", keys::key_name(key)),
            Some(&name),
            press,
        )
    } else {
        press()
    }
}

pub fn send_chars(m: &mut Machine, chars: &str, delay: Option<f64>) -> Result<(), ApiError> {
    // Refuse before typing half of it.
    for c in chars.chars() {
        keys::qemu_keys(&c.to_string()).map_err(ApiError::Assertion)?;
    }
    let name = m.name.clone();
    let logger = m.logger().clone();
    logger.nested(format!("sending keys {chars:?}"), Some(&name), || {
        for c in chars.chars() {
            send_key(m, &c.to_string(), delay, false)?;
        }
        Ok(())
    })
}

// -- screenshots and OCR

/// A screendump of the running machine into its state dir, read back.
fn grab(m: &mut Machine, deadline: Instant) -> Result<(PathBuf, DynamicImage), ApiError> {
    qmp(m)?;
    let dir = screen_dir(m)?;
    let path = dir.join("screen.ppm");
    let _ = std::fs::remove_file(&path);
    let filename = path
        .to_str()
        .ok_or_else(|| machine_err(format!("non-UTF-8 path {}", path.display())))?
        .to_owned();
    let left = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(100), QMP_TIMEOUT);
    qmp(m)?
        .execute("screendump", Some(json!({ "filename": filename })), left)
        .map_err(|e| {
            if e.is_timeout() {
                ApiError::Timeout(format!("screendump: {e}"))
            } else {
                ApiError::Machine(format!("screendump: {e}"))
            }
        })?;
    let img = imaging::load(&path).map_err(machine_err)?;
    Ok((path, img))
}

fn screen_dir(m: &Machine) -> Result<PathBuf, ApiError> {
    let dir = m.state_dir().join("screen");
    std::fs::create_dir_all(&dir)
        .map_err(|e| machine_err(format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}

fn tesseract() -> Result<PathBuf, ApiError> {
    // Upstream's text first (its tests assert on it); vmrig has no `enableOCR`, it needs
    // tesseract on the host.
    ocr::find_tesseract(std::env::var_os("PATH").as_deref())
        .map_err(|e| ApiError::Machine(format!("OCR requested but enableOCR is false: {e}")))
}

/// How many tesseract processes run at once: half the host's CPUs (the VMs need the rest),
/// at least one, at most four.
fn ocr_parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() / 2)
        .unwrap_or(1)
        .clamp(1, 4)
}

/// The OCR jobs for one screenshot: the raw screen first, then (when `variants`) the
/// processed variants, made only once the raw one is under way.
fn ocr_jobs<'a>(
    shot: &'a Path,
    img: &'a DynamicImage,
    variants: bool,
) -> impl Iterator<Item = Result<ocr::Job, String>> + 'a {
    let raw = std::iter::once(Ok(ocr::Job {
        name: "raw",
        image: shot.to_owned(),
    }));
    let mut pending: Option<std::vec::IntoIter<Result<ocr::Job, String>>> = None;
    let processed = std::iter::from_fn(move || {
        if !variants {
            return None;
        }
        let jobs = pending.get_or_insert_with(|| {
            let dir = shot.parent().unwrap_or(Path::new("."));
            imaging::variants(img)
                .into_iter()
                .map(|v| {
                    let path = dir.join(format!("{}.pgm", v.name));
                    imaging::save_pgm(&v.image, &path)?;
                    Ok(ocr::Job {
                        name: v.name,
                        image: path,
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
        });
        jobs.next()
    });
    raw.chain(processed)
}

/// Order of the variants in results.
const VARIANT_ORDER: &[&str] = &["raw", "gray", "inverted", "threshold"];

fn ocr_all(
    tess: &Path,
    shot: &Path,
    img: &DynamicImage,
    variants: bool,
    deadline: Instant,
) -> Result<Vec<(&'static str, String)>, ApiError> {
    match ocr::run(
        tess,
        ocr_jobs(shot, img, variants),
        ocr_parallelism(),
        deadline,
        |_, _| false,
    )
    .map_err(ApiError::Machine)?
    {
        ocr::Outcome::All(mut texts) => {
            texts.sort_by_key(|(name, _)| VARIANT_ORDER.iter().position(|v| v == name));
            Ok(texts)
        }
        ocr::Outcome::Stopped(name, text) => Ok(vec![(name, text)]),
        ocr::Outcome::TimedOut(_) => Err(ApiError::Timeout(
            "OCR did not finish in time (tesseract killed)".into(),
        )),
    }
}

/// A bound for the one-shot OCR calls.
const OCR_CALL_TIMEOUT: f64 = 120.0;

/// Upstream raises this when a test reads the screen of a machine without OCR; vmrig's
/// OCR needs a display (`graphics = true`), and the message says which one is missing.
fn require_display_for_ocr(m: &Machine) -> Result<(), ApiError> {
    if m.has_no_display() {
        return Err(ApiError::Machine(format!(
            "OCR requested but enableOCR is false: `{}` has no display (set `graphics = true` on the node)",
            m.name
        )));
    }
    Ok(())
}

pub fn get_screen_text(m: &mut Machine) -> Result<String, ApiError> {
    require_display_for_ocr(m)?;
    let tess = tesseract()?;
    let deadline = m.deadline_in(Some(OCR_CALL_TIMEOUT));
    let (shot, img) = grab(m, deadline)?;
    let texts = ocr_all(&tess, &shot, &img, false, deadline)?;
    Ok(texts.into_iter().map(|(_, t)| t).next().unwrap_or_default())
}

pub fn get_screen_text_variants(m: &mut Machine) -> Result<Vec<String>, ApiError> {
    require_display_for_ocr(m)?;
    let tess = tesseract()?;
    let deadline = m.deadline_in(Some(OCR_CALL_TIMEOUT));
    let (shot, img) = grab(m, deadline)?;
    let texts = ocr_all(&tess, &shot, &img, true, deadline)?;
    Ok(texts.into_iter().map(|(_, t)| t).collect())
}

pub fn wait_for_text(m: &mut Machine, regex: &str, timeout: f64) -> Result<(), ApiError> {
    let re = compile(regex)?;
    require_display_for_ocr(m)?;
    let tess = tesseract()?;
    let name = m.name.clone();
    let logger = m.logger().clone();
    logger.nested(
        format!("waiting for {regex:?} to appear on the screen"),
        Some(&name),
        || {
            let mut last: Option<DynamicImage> = None;
            let mut attempts = 0u32;
            let deadline = m.deadline_in(Some(timeout));
            let result = m.poll(
                &format!("waiting for {regex:?} on the screen (OCR)"),
                timeout,
                |m, left| {
                    attempts += 1;
                    let attempt_deadline = (Instant::now() + Duration::from_secs_f64(left)).min(deadline);
                    let started = Instant::now();
                    let (shot, img) = grab(m, attempt_deadline)?;
                    let outcome = ocr::run(
                        &tess,
                        ocr_jobs(&shot, &img, true),
                        ocr_parallelism(),
                        attempt_deadline,
                        |_, text| re.is_match(text),
                    )
                    .map_err(ApiError::Machine)?;
                    last = Some(img);
                    Ok(match outcome {
                        ocr::Outcome::Stopped(variant, _) => {
                            log(
                                m,
                                format!(
                                    "found {regex:?} on the screen (OCR attempt {attempts}, variant `{variant}`, {:.2} s)",
                                    started.elapsed().as_secs_f64()
                                ),
                            );
                            Ok(())
                        }
                        ocr::Outcome::All(texts) => Err(format!(
                            "after {attempts} OCR attempt(s) the screen read:\n{}",
                            describe(&texts)
                        )),
                        ocr::Outcome::TimedOut(texts) => Err(format!(
                            "the timeout cut OCR attempt {attempts} short; the screen read:\n{}",
                            describe(&texts)
                        )),
                    })
                },
            );
            if let (Err(e), Some(img)) = (&result, &last) {
                let saved = save_failure(m, "wait_for_text", img, None);
                return Err(with_note(e, saved));
            }
            result
        },
    )
}

fn describe(texts: &[(&str, String)]) -> String {
    if texts.is_empty() {
        return "  (no OCR variant finished)".into();
    }
    texts
        .iter()
        .map(|(v, t)| format!("  {v}: {:?}", short(t, 400)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Saves the last screen of a failed wait (and `details`) to the output dir; says where.
fn save_failure(m: &Machine, what: &str, img: &DynamicImage, details: Option<&str>) -> String {
    let base = m.out_dir().join(format!("{}-{what}-failed", m.name));
    let png = base.with_extension("png");
    let mut note = match std::fs::create_dir_all(m.out_dir())
        .map_err(|e| e.to_string())
        .and_then(|()| imaging::save_png(img, &png))
    {
        Ok(()) => format!("last screen saved to {}", png.display()),
        Err(e) => format!("could not save the last screen: {e}"),
    };
    if let Some(details) = details {
        let txt = base.with_extension("txt");
        if std::fs::write(&txt, details).is_ok() {
            note.push_str(&format!(", details in {}", txt.display()));
        }
    }
    log(m, note.clone());
    note
}

fn with_note(e: &ApiError, note: String) -> ApiError {
    match e {
        ApiError::Assertion(s) => ApiError::Assertion(format!("{s}\n{note}")),
        ApiError::Machine(s) => ApiError::Machine(format!("{s}\n{note}")),
        ApiError::Timeout(s) => ApiError::Timeout(format!("{s}\n{note}")),
    }
}

// -- image matching

fn load_reference(path: &str) -> Result<image::GrayImage, ApiError> {
    imaging::load(Path::new(path))
        .map(|img| img.to_luma8())
        .map_err(|e| ApiError::Assertion(format!("reference image: {e}")))
}

fn match_screen(
    m: &mut Machine,
    reference: &image::GrayImage,
    deadline: Instant,
) -> Result<(DynamicImage, matching::Match), ApiError> {
    let (_, img) = grab(m, deadline)?;
    let found = matching::best_match(&img.to_luma8(), reference).map_err(ApiError::Assertion)?;
    Ok((img, found))
}

pub fn screen_matches(m: &mut Machine, path: &str, threshold: f64) -> Result<bool, ApiError> {
    let reference = load_reference(path)?;
    let deadline = m.deadline_in(Some(QMP_TIMEOUT.as_secs_f64()));
    let (_, found) = match_screen(m, &reference, deadline)?;
    let ok = found.score >= threshold;
    log(
        m,
        format!(
            "{path} {} the screen: best score {:.4} at ({}, {}) (threshold {threshold})",
            if ok { "matches" } else { "does not match" },
            found.score,
            found.x,
            found.y
        ),
    );
    Ok(ok)
}

pub fn wait_for_image(
    m: &mut Machine,
    path: &str,
    threshold: f64,
    timeout: f64,
) -> Result<(), ApiError> {
    let reference = load_reference(path)?;
    let name = m.name.clone();
    let logger = m.logger().clone();
    logger.nested(
        format!("waiting for {path} to appear on the screen"),
        Some(&name),
        || {
            let mut last: Option<(DynamicImage, matching::Match)> = None;
            let deadline = m.deadline_in(Some(timeout));
            let result = m.poll(
                &format!("waiting for {path} on the screen"),
                timeout,
                |m, left| {
                    let attempt_deadline = (Instant::now() + Duration::from_secs_f64(left)).min(deadline);
                    let (img, found) = match_screen(m, &reference, attempt_deadline)?;
                    last = Some((img, found));
                    Ok(if found.score >= threshold {
                        log(
                            m,
                            format!(
                                "found {path} at ({}, {}), score {:.4}",
                                found.x, found.y, found.score
                            ),
                        );
                        Ok(())
                    } else {
                        Err(format!(
                            "best score {:.4} at ({}, {}) is below the threshold {threshold}",
                            found.score, found.x, found.y
                        ))
                    })
                },
            );
            if let (Err(e), Some((img, found))) = (&result, &last) {
                let details = format!(
                    "reference: {path}\nthreshold: {threshold}\nbest score: {:.4}\nbest position: {} {}\n",
                    found.score, found.x, found.y
                );
                let saved = save_failure(m, "wait_for_image", img, Some(&details));
                return Err(with_note(e, saved));
            }
            result
        },
    )
}

// -- X11 (through the guest shell)

/// Runs X clients on the first display unless the guest shell says otherwise.
const X_ENV: &str = "DISPLAY=${DISPLAY:-:0}";

pub fn wait_for_x(m: &mut Machine, timeout: f64) -> Result<(), ApiError> {
    let name = m.name.clone();
    let logger = m.logger().clone();
    let check = format!(
        "test -e /tmp/.X11-unix/X0 && {{ ! command -v xwininfo >/dev/null || {X_ENV} xwininfo -root >/dev/null 2>&1; }}"
    );
    logger.nested("waiting for the X11 server", Some(&name), || {
        m.poll("waiting for the X11 server", timeout, |m, left| {
            let (status, _) = m.execute(&check, Some(left))?;
            Ok(if status == 0 {
                Ok(())
            } else {
                Err("no X server accepts connections on :0 yet".to_owned())
            })
        })
    })
}

/// Window names from `xwininfo -root -tree` output (upstream's sed, in Rust).
pub fn parse_window_names(tree: &str) -> Vec<String> {
    let re = Regex::new(r#"0x[0-9a-f]+ "([^"]*)""#).expect("valid regex");
    tree.lines()
        .filter_map(|line| re.captures(line).map(|c| c[1].to_owned()))
        .collect()
}

/// `(status, window names)`; status 0 when X answered.
fn window_names(
    m: &mut Machine,
    timeout: Option<f64>,
) -> Result<(i32, Vec<String>, String), ApiError> {
    let (status, out) = m.execute(&format!("{X_ENV} xwininfo -root -tree 2>&1"), timeout)?;
    if status == 127 {
        return Err(ApiError::Machine(format!(
            "`{}` has no `xwininfo`: add x11-utils to the node's packages",
            m.name
        )));
    }
    Ok((status, parse_window_names(&out), out))
}

pub fn get_window_names(m: &mut Machine) -> Result<Vec<String>, ApiError> {
    let name = m.name.clone();
    let logger = m.logger().clone();
    logger.nested("getting the X11 window names", Some(&name), || {
        let (status, names, out) = window_names(m, None)?;
        if status != 0 {
            return Err(ApiError::Assertion(format!(
                "xwininfo failed (exit code {status}): {}",
                short(&out, 400)
            )));
        }
        Ok(names)
    })
}

pub fn wait_for_window(m: &mut Machine, regexp: &str, timeout: f64) -> Result<(), ApiError> {
    let re = compile(regexp)?;
    let name = m.name.clone();
    let logger = m.logger().clone();
    logger.nested(
        format!("waiting for a window matching {regexp:?} to appear"),
        Some(&name),
        || {
            m.poll(
                &format!("waiting for a window matching {regexp:?}"),
                timeout,
                |m, left| {
                    let (status, names, out) = window_names(m, Some(left))?;
                    Ok(if status != 0 {
                        Err(format!("X does not answer yet: {}", short(&out, 200)))
                    } else if names.iter().any(|n| re.is_match(n)) {
                        Ok(())
                    } else {
                        Err(format!("the windows are: {names:?}"))
                    })
                },
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_names_parse_like_upstreams_sed() {
        let tree = r#"
xwininfo: Window id: 0x4ec (the root window) (has no name)

  Root window id: 0x4ec (the root window) (has no name)
  Parent window id: 0x0 (none)
     2 children:
     0x400001 "xterm": ("xterm" "XTerm")  484x316+0+0  +0+0
        1 child:
        0x400002 (has no name): ()  484x316+0+0  +0+0
     0x200001 "vmrig term  0x1 \"x\"": ()  10x10+0+0  +0+0
"#;
        assert_eq!(parse_window_names(tree), ["xterm", "vmrig term  0x1 \\"]);
    }

    #[test]
    fn thresholds_are_checked() {
        assert!(threshold(Some(1.5)).is_err());
        assert!(threshold(Some(0.0)).is_err());
        assert_eq!(threshold(None).unwrap(), DEFAULT_THRESHOLD);
        assert_eq!(threshold(Some(1.0)).unwrap(), 1.0);
    }
}
