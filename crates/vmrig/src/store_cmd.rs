//! `vmrig store list` and `vmrig store gc` (`push` and `pull` are in `cache_cmd`).

use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Subcommand;
use vmrig_store::{FreeSpace, GcPolicy, Store};

use crate::exit;
use crate::units::{format_age, format_bytes, parse_duration};

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Push the local store paths of these tests (or all) to the cache (--cache URL).
    Push {
        /// Test files; none: every path of the local store.
        #[arg(value_name = "FILE")]
        files: Vec<std::path::PathBuf>,
    },
    /// Fetch the images of these tests from the cache (--cache URL); builds nothing.
    Pull {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<std::path::PathBuf>,
    },
    /// List the store's paths: name, size, last use, and whether something is using them.
    List,
    /// Remove store paths not used for a while (never those in use) and leftovers of
    /// interrupted builds.
    Gc {
        /// Remove paths last used at least this long ago: 7d, 12h, 30m, 45s, or 0.
        #[arg(long, value_name = "AGE", default_value = "7d", value_parser = parse_duration)]
        older_than: Duration,
        /// Remove every path not in use (same as --older-than 0).
        #[arg(long, conflicts_with = "older_than")]
        all: bool,
        /// Show what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only boot snapshots (the next run of each node boots cold and saves a new one).
        #[arg(long)]
        snapshots: bool,
        /// Instead of by age: remove the least recently used paths (never those in use)
        /// until SIZE is free on the store's disk, e.g. 20G. Builds do this by
        /// themselves below VMRIG_STORE_MIN_FREE (default 5G).
        #[arg(long, value_name = "SIZE", value_parser = parse_size_arg,
              conflicts_with_all = ["older_than", "all", "dry_run", "snapshots"])]
        free: Option<u64>,
    },
}

pub fn run(command: StoreCommand) -> anyhow::Result<i32> {
    match &command {
        StoreCommand::Push { files } => return crate::cache_cmd::push(files),
        StoreCommand::Pull { files } => return crate::cache_cmd::pull(files),
        _ => {}
    }
    let store = Store::open_default().context("failed to open the image store")?;
    match command {
        StoreCommand::Push { .. } | StoreCommand::Pull { .. } => unreachable!("handled above"),
        StoreCommand::List => list(&store),
        StoreCommand::Gc {
            free: Some(free), ..
        } => make_room(&store, free),
        StoreCommand::Gc {
            older_than,
            all,
            dry_run,
            snapshots,
            free: None,
        } => gc(
            &store,
            &GcPolicy {
                older_than: if all { Duration::ZERO } else { older_than },
                dry_run,
                name_prefix: snapshots.then(|| vmrig_driver::snapshot::NAME_PREFIX.to_owned()),
            },
        ),
    }
}

fn list(store: &Store) -> anyhow::Result<i32> {
    let entries = store
        .list()
        .with_context(|| format!("failed to list the store {}", store.root().display()))?;
    let mut out = std::io::stdout().lock();
    if entries.is_empty() {
        writeln!(out, "the store {} is empty", store.root().display())?;
        return Ok(exit::OK);
    }
    let now = SystemTime::now();
    let rows: Vec<[String; 4]> = entries
        .iter()
        .map(|e| {
            [
                format!("{}-{}", e.hash, e.name),
                format_bytes(e.size_bytes),
                format_age(e.last_used, now),
                if e.in_use { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    let header = ["NAME", "SIZE", "LAST USED", "IN USE"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        writeln!(
            out,
            "{:<w0$}  {:>w1$}  {:<w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        )?;
    }
    let total: u64 = entries.iter().map(|e| e.size_bytes).sum();
    writeln!(
        out,
        "{} path{}, {} in {}",
        entries.len(),
        if entries.len() == 1 { "" } else { "s" },
        format_bytes(total),
        store.root().display()
    )?;
    Ok(exit::OK)
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    vmrig_store::parse_size(text)
        .ok_or_else(|| format!("{text:?} is not a size: write 20G, 512M or bytes"))
}

fn make_room(store: &Store, free: u64) -> anyhow::Result<i32> {
    let space = FreeSpace {
        min_free: free,
        target_free: free,
    };
    let report = store
        .make_room_to(space)
        .with_context(|| format!("failed to make room in {}", store.root().display()))?;
    let mut out = std::io::stdout().lock();
    for entry in &report.removed {
        let age = format_age(entry.last_used, SystemTime::now());
        writeln!(
            out,
            "removed {}-{} ({}, used {age})",
            entry.hash,
            entry.name,
            format_bytes(entry.size_bytes)
        )?;
    }
    let now_free = vmrig_store::free_bytes(store.root()).unwrap_or(0);
    writeln!(
        out,
        "removed {} path{}, freed {}; {} free on the store's disk",
        report.removed.len(),
        if report.removed.len() == 1 { "" } else { "s" },
        format_bytes(report.freed_bytes),
        format_bytes(now_free)
    )?;
    if now_free < free {
        writeln!(
            out,
            "less than {} free: the rest is in use or outside the store",
            format_bytes(free)
        )?;
    }
    Ok(exit::OK)
}

fn gc(store: &Store, policy: &GcPolicy) -> anyhow::Result<i32> {
    let report = store
        .gc(policy)
        .with_context(|| format!("failed to collect garbage in {}", store.root().display()))?;
    let mut out = std::io::stdout().lock();
    let verb = if policy.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for entry in &report.removed {
        writeln!(
            out,
            "{verb} {}-{} ({})",
            entry.hash,
            entry.name,
            format_bytes(entry.size_bytes)
        )?;
    }
    for tmp in &report.removed_tmp {
        writeln!(out, "{verb} leftover {}", tmp.display())?;
    }
    for entry in &report.kept_in_use {
        writeln!(out, "kept {}-{} (in use)", entry.hash, entry.name)?;
    }
    let count = report.removed.len();
    writeln!(
        out,
        "{} {count} path{}, {} {}; kept {} in use and {} used recently",
        if policy.dry_run {
            "would remove"
        } else {
            "removed"
        },
        if count == 1 { "" } else { "s" },
        if policy.dry_run {
            "would free"
        } else {
            "freed"
        },
        format_bytes(report.freed_bytes),
        report.kept_in_use.len(),
        report.kept_recent.len(),
    )?;
    Ok(exit::OK)
}
