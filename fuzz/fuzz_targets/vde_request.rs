//! `vde::parse_request` (vde_switch's `request_v3`, sent by a VDE client on the `ctl` socket)
//! on arbitrary bytes: a request or a `VdeError`, never a panic. What parses encodes back to
//! the same request (when the description survives the encoder's cut), and any well-formed
//! (port, path, description) survives `encode_request` + `parse_request`.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmrig_net::vde::{
    encode_request, parse_request, PortRequest, MAXDESCR, MAX_REQUEST_LEN, SUN_PATH_LEN,
};

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(req) => {
            let path = req.client_path.as_os_str().as_bytes();
            assert!(!path.is_empty() && path.len() < SUN_PATH_LEN && !path.contains(&0));
            assert!(!req.description.contains('\0'));
            // At most MAXDESCR bytes, each replaced by at most 3 bytes of U+FFFD.
            assert!(req.description.len() <= 3 * MAXDESCR);
            let _ = (req.label(), req.pid());
            if let PortRequest::Number(n) = req.port {
                assert!(n != 0 && n < 1 << 24);
            }
            let wire = encode_request(req.port, &req.client_path, &req.description)
                .expect("a parsed request encodes");
            let again = parse_request(&wire).expect("an encoded request parses");
            assert_eq!(
                (again.port, &again.client_path),
                (req.port, &req.client_path)
            );
            if req.description.len() < MAXDESCR {
                assert_eq!(again.description, req.description);
            }
            // Bytes past the longest request are ignored.
            let mut longer = data.to_vec();
            longer.resize(data.len().max(MAX_REQUEST_LEN) + 16, b'x');
            if data.len() >= MAX_REQUEST_LEN {
                assert_eq!(parse_request(&longer).unwrap(), req);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    // The client's side: byte 0 picks the port, 1 the path length, the rest path + text.
    if let [kind, len, rest @ ..] = data {
        let port = match kind % 3 {
            0 => PortRequest::Any,
            1 => PortRequest::Port0,
            _ => PortRequest::Number((*kind as u32 >> 2) + 1),
        };
        let n = (*len as usize % (SUN_PATH_LEN - 1)).min(rest.len());
        let (path, descr) = rest.split_at(n);
        if path.is_empty() || path.contains(&0) {
            return;
        }
        let path = Path::new(OsStr::from_bytes(path));
        let descr = String::from_utf8_lossy(descr);
        let wire = encode_request(port, path, &descr).expect("a path that fits");
        let req = parse_request(&wire).expect("an encoded request parses");
        assert_eq!((req.port, req.client_path.as_path()), (port, path));
        let cut = descr.split('\0').next().unwrap().as_bytes();
        let cut = &cut[..cut.len().min(MAXDESCR - 1)];
        assert_eq!(req.description, String::from_utf8_lossy(cut));
    }
});
