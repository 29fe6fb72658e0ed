//! The switch's decisions, free of I/O: where a frame goes (MAC learning) and whether the fault
//! policy (link state, loss, delay, partitions) lets it through. Ports are small indices.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::frame::MIN_FRAME;

pub type Mac = [u8; 6];
pub type PortId = usize;

/// How long a learned MAC stays in the table without being seen again.
pub const DEFAULT_MAC_AGING: Duration = Duration::from_secs(300);

/// The destination MAC of an Ethernet frame.
///
/// # Panics
///
/// If `frame` is shorter than 6 bytes ([`route`] checks the length first).
pub fn dst_mac(frame: &[u8]) -> Mac {
    frame[0..6].try_into().expect("frame shorter than 14 bytes")
}

/// The source MAC of an Ethernet frame.
///
/// # Panics
///
/// If `frame` is shorter than 12 bytes ([`route`] checks the length first).
pub fn src_mac(frame: &[u8]) -> Mac {
    frame[6..12]
        .try_into()
        .expect("frame shorter than 14 bytes")
}

/// Broadcast and multicast addresses have the group bit (lowest bit of the first octet) set.
pub fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 == 1
}

/// Source MAC -> port, with aging.
#[derive(Debug)]
pub struct MacTable {
    entries: HashMap<Mac, (PortId, Instant)>,
    aging: Duration,
    last_sweep: Option<Instant>,
}

impl Default for MacTable {
    fn default() -> Self {
        Self::new(DEFAULT_MAC_AGING)
    }
}

impl MacTable {
    pub fn new(aging: Duration) -> Self {
        MacTable {
            entries: HashMap::new(),
            aging,
            last_sweep: None,
        }
    }

    /// Record that `mac` was seen on `port` at `now`. Group addresses are never learned.
    pub fn learn(&mut self, mac: Mac, port: PortId, now: Instant) {
        if is_group(&mac) {
            return;
        }
        match self.entries.get_mut(&mac) {
            Some(e) => *e = (port, now),
            None => {
                self.entries.insert(mac, (port, now));
            }
        }
        // Expired entries are removed lazily, at most once per aging period.
        match self.last_sweep {
            Some(t) if now.saturating_duration_since(t) < self.aging => {}
            _ => {
                self.last_sweep = Some(now);
                let aging = self.aging;
                self.entries
                    .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < aging);
            }
        }
    }

    /// The port `mac` was last seen on, unless that was longer ago than the aging time.
    pub fn lookup(&self, mac: &Mac, now: Instant) -> Option<PortId> {
        self.entries
            .get(mac)
            .filter(|(_, seen)| now.saturating_duration_since(*seen) < self.aging)
            .map(|(p, _)| *p)
    }

    /// Forget everything learned on `port` (its peer went away).
    pub fn forget_port(&mut self, port: PortId) {
        self.entries.retain(|_, (p, _)| *p != port);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The one port its destination MAC was learned on.
    Unicast(PortId),
    /// Every other port (broadcast, multicast, unknown unicast).
    Flood,
    /// Destination is on the port it came from, or the frame is too short to be Ethernet
    /// (see [`route`]): nothing to do.
    Filter,
}

/// Learn the source, then decide the destination of `frame` from `src`. A frame shorter
/// than [`MIN_FRAME`] (no room for two MACs and an ethertype; a peer can send any length) is
/// neither learned from nor forwarded: [`Target::Filter`].
pub fn route(table: &mut MacTable, frame: &[u8], src: PortId, now: Instant) -> Target {
    if frame.len() < MIN_FRAME {
        return Target::Filter;
    }
    table.learn(src_mac(frame), src, now);
    let dst = dst_mac(frame);
    if is_group(&dst) {
        return Target::Flood;
    }
    match table.lookup(&dst, now) {
        Some(p) if p == src => Target::Filter,
        Some(p) => Target::Unicast(p),
        None => Target::Flood,
    }
}

/// Why a frame was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The sending port's link is down.
    SrcLinkDown,
    /// The receiving port's link is down.
    DstLinkDown,
    /// Random loss.
    Loss,
    /// Sender and receiver are on opposite sides of a partition.
    Partition,
}

/// Fault injection state of one VLAN. Pure data; the switch consults it per frame.
#[derive(Debug, Clone, Default)]
pub struct FaultPolicy {
    /// Per port; a port missing here is up.
    link_down: Vec<bool>,
    /// Probability in [0, 1] of dropping a frame at ingress.
    loss: f64,
    /// Added to every frame's delivery time.
    delay: Duration,
    /// Pairs of port groups that cannot talk to each other.
    partitions: Vec<(Vec<PortId>, Vec<PortId>)>,
}

impl FaultPolicy {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_link(&mut self, port: PortId, up: bool) {
        if self.link_down.len() <= port {
            self.link_down.resize(port + 1, false);
        }
        self.link_down[port] = !up;
    }

    pub fn link_up(&self, port: PortId) -> bool {
        !self.link_down.get(port).copied().unwrap_or(false)
    }

    /// Loss in percent; clamped to 0..=100 (NaN counts as 0).
    pub fn set_loss_percent(&mut self, percent: f64) {
        self.loss = if percent.is_nan() {
            0.0
        } else {
            (percent / 100.0).clamp(0.0, 1.0)
        };
    }

    pub fn loss_percent(&self) -> f64 {
        self.loss * 100.0
    }

    pub fn set_delay(&mut self, delay: Duration) {
        self.delay = delay;
    }

    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// No frame crosses between a port in `a` and a port in `b` (both ways). Adds to the
    /// partitions already in force.
    pub fn partition(&mut self, a: Vec<PortId>, b: Vec<PortId>) {
        self.partitions.push((a, b));
    }

    /// Lift every partition.
    pub fn heal(&mut self) {
        self.partitions.clear();
    }

    pub fn separated(&self, x: PortId, y: PortId) -> bool {
        self.partitions
            .iter()
            .any(|(a, b)| (a.contains(&x) && b.contains(&y)) || (a.contains(&y) && b.contains(&x)))
    }

    /// Decision when a frame arrives from `src`. `sample` is uniform in [0, 1). Returns the delay
    /// to apply.
    pub fn ingress(&self, src: PortId, sample: f64) -> Result<Duration, DropReason> {
        if !self.link_up(src) {
            return Err(DropReason::SrcLinkDown);
        }
        if self.loss > 0.0 && sample < self.loss {
            return Err(DropReason::Loss);
        }
        Ok(self.delay)
    }

    /// Decision when a frame from `src` is about to be handed to `dst` (after any delay).
    pub fn egress(&self, src: PortId, dst: PortId) -> Result<(), DropReason> {
        if !self.link_up(dst) {
            return Err(DropReason::DstLinkDown);
        }
        if !self.partitions.is_empty() && self.separated(src, dst) {
            return Err(DropReason::Partition);
        }
        Ok(())
    }
}

/// Small fast PRNG (SplitMix64) for loss decisions; no need for cryptographic quality.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Seeded from the clock and a caller-supplied salt.
    pub fn from_entropy(salt: u64) -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng(t ^ salt.rotate_left(32) ^ (std::process::id() as u64))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn sample(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: Mac, src: Mac) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f
    }

    const A: Mac = [0x52, 0x54, 0, 0x12, 1, 1];
    const B: Mac = [0x52, 0x54, 0, 0x12, 1, 2];
    const BCAST: Mac = [0xff; 6];

    #[test]
    fn learning_and_flooding() {
        let mut t = MacTable::default();
        let now = Instant::now();
        assert_eq!(route(&mut t, &frame(B, A), 0, now), Target::Flood);
        assert_eq!(route(&mut t, &frame(A, B), 1, now), Target::Unicast(0));
        assert_eq!(route(&mut t, &frame(B, A), 0, now), Target::Unicast(1));
        assert_eq!(route(&mut t, &frame(BCAST, A), 0, now), Target::Flood);
        let mcast = [0x33, 0x33, 0, 0, 0, 1];
        assert_eq!(route(&mut t, &frame(mcast, A), 0, now), Target::Flood);
        // A multicast source is never learned.
        route(&mut t, &frame(A, mcast), 1, now);
        assert_eq!(t.lookup(&mcast, now), None);
        // Hairpin: destination on the source port.
        assert_eq!(route(&mut t, &frame(A, B), 0, now), Target::Filter);
    }

    #[test]
    fn short_frames_are_filtered_not_a_panic() {
        // Found by the `switch_frames` fuzz target: a 0-byte frame panicked in `src_mac`.
        let mut t = MacTable::default();
        let now = Instant::now();
        let full = frame(B, A);
        for len in 0..MIN_FRAME {
            assert_eq!(route(&mut t, &full[..len], 0, now), Target::Filter, "{len}");
        }
        assert!(t.is_empty(), "nothing learned from short frames");
        assert_eq!(route(&mut t, &full, 0, now), Target::Flood);
        assert_eq!(t.lookup(&A, now), Some(0));
    }

    #[test]
    fn station_moves_and_ages() {
        let mut t = MacTable::new(Duration::from_secs(10));
        let now = Instant::now();
        t.learn(A, 0, now);
        assert_eq!(t.lookup(&A, now), Some(0));
        t.learn(A, 3, now);
        assert_eq!(t.lookup(&A, now), Some(3));
        assert_eq!(t.lookup(&A, now + Duration::from_secs(11)), None);
        t.learn(B, 1, now + Duration::from_secs(11));
        assert_eq!(t.len(), 1, "expired entry swept");
        t.forget_port(1);
        assert!(t.is_empty());
    }

    #[test]
    fn link_down_blocks_both_directions() {
        let mut p = FaultPolicy::new();
        assert!(p.link_up(5));
        p.set_link(1, false);
        assert_eq!(p.ingress(1, 0.5), Err(DropReason::SrcLinkDown));
        assert_eq!(p.egress(0, 1), Err(DropReason::DstLinkDown));
        assert_eq!(p.ingress(0, 0.5), Ok(Duration::ZERO));
        assert_eq!(p.egress(1, 0), Ok(()));
        p.set_link(1, true);
        assert_eq!(p.ingress(1, 0.5), Ok(Duration::ZERO));
        assert_eq!(p.egress(0, 1), Ok(()));
    }

    #[test]
    fn loss_bounds() {
        let mut p = FaultPolicy::new();
        let mut rng = Rng::new(1);
        for _ in 0..10_000 {
            assert!(p.ingress(0, rng.sample()).is_ok());
        }
        p.set_loss_percent(100.0);
        for _ in 0..10_000 {
            assert_eq!(p.ingress(0, rng.sample()), Err(DropReason::Loss));
        }
        assert_eq!(p.ingress(0, 0.0), Err(DropReason::Loss));
        assert_eq!(p.ingress(0, 0.999_999_999), Err(DropReason::Loss));
        p.set_loss_percent(30.0);
        let dropped = (0..100_000)
            .filter(|_| p.ingress(0, rng.sample()).is_err())
            .count();
        assert!((27_000..33_000).contains(&dropped), "{dropped}");
        p.set_loss_percent(f64::NAN);
        assert_eq!(p.loss_percent(), 0.0);
        p.set_loss_percent(250.0);
        assert_eq!(p.loss_percent(), 100.0);
    }

    #[test]
    fn delay_is_returned() {
        let mut p = FaultPolicy::new();
        p.set_delay(Duration::from_millis(40));
        assert_eq!(p.ingress(0, 0.5), Ok(Duration::from_millis(40)));
    }

    #[test]
    fn partition_and_heal() {
        let mut p = FaultPolicy::new();
        p.partition(vec![0, 1], vec![2]);
        assert_eq!(p.egress(0, 2), Err(DropReason::Partition));
        assert_eq!(p.egress(2, 1), Err(DropReason::Partition));
        assert_eq!(p.egress(0, 1), Ok(()));
        assert_eq!(
            p.egress(3, 2),
            Ok(()),
            "ports outside both groups are unaffected"
        );
        p.heal();
        assert_eq!(p.egress(0, 2), Ok(()));
    }

    #[test]
    fn rng_is_uniformish() {
        let mut r = Rng::new(42);
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            let s = r.sample();
            assert!((0.0..1.0).contains(&s));
            buckets[(s * 10.0) as usize] += 1;
        }
        assert!(buckets.iter().all(|&b| (9_000..11_000).contains(&b)));
    }
}
