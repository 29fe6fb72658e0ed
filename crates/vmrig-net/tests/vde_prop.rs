//! `vde::parse_request` on arbitrary input: never panics (it is also a fuzz target), and reads
//! back whatever the client-side encoder wrote.

use std::path::PathBuf;

use proptest::prelude::*;
use vmrig_net::vde::{
    encode_reply, encode_request, parse_reply, parse_request, PortRequest, VdeError, HEADER_LEN,
    MAX_REQUEST_LEN, SWITCH_MAGIC,
};

fn port_request() -> impl Strategy<Value = PortRequest> {
    prop_oneof![
        Just(PortRequest::Any),
        Just(PortRequest::Port0),
        (1u32..(1 << 24)).prop_map(PortRequest::Number),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_request(&bytes);
    }

    /// Random bytes behind a valid magic and version reach the deeper checks.
    #[test]
    fn never_panics_past_the_magic(
        tail in prop::collection::vec(any::<u8>(), 0..300),
        version in prop_oneof![Just(3u32), any::<u32>()],
    ) {
        let mut b = SWITCH_MAGIC.to_ne_bytes().to_vec();
        b.extend_from_slice(&version.to_ne_bytes());
        b.extend_from_slice(&tail);
        match parse_request(&b) {
            Ok(r) => {
                prop_assert!(b.len() >= HEADER_LEN);
                prop_assert!(r.description.len() <= 3 * (MAX_REQUEST_LEN - HEADER_LEN));
                let _ = (r.label(), r.pid());
            }
            Err(VdeError::Short(n)) => prop_assert!(n < HEADER_LEN),
            Err(_) => {}
        }
    }

    /// Any valid request, cut anywhere or with any one byte changed: no panic.
    #[test]
    fn never_panics_on_damaged_requests(
        cut in 0usize..MAX_REQUEST_LEN + 10,
        at in 0usize..MAX_REQUEST_LEN,
        byte in any::<u8>(),
    ) {
        let mut b = encode_request(PortRequest::Any, std::path::Path::new("/s/.01234-00001"),
            "QEMU user=someone PID=1234").unwrap();
        b.resize(MAX_REQUEST_LEN, b'x');
        if let Some(x) = b.get_mut(at) {
            *x = byte;
        }
        b.truncate(cut);
        let _ = parse_request(&b);
    }

    #[test]
    fn roundtrip(
        port in port_request(),
        path in "/[a-z0-9._-]{1,100}",
        descr in "[ -~]{0,200}",
    ) {
        let path = PathBuf::from(path);
        let b = encode_request(port, &path, &descr).unwrap();
        prop_assert!(b.len() >= HEADER_LEN && b.len() < MAX_REQUEST_LEN);
        let r = parse_request(&b).unwrap();
        prop_assert_eq!(r.port, port);
        prop_assert_eq!(&r.client_path, &path);
        let want: String = descr.chars().take(127).collect();
        prop_assert_eq!(r.description, want);
        prop_assert_eq!(parse_reply(&encode_reply(&path).unwrap()), Some(path));
    }
}
