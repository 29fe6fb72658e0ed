//! `kv`: a tiny key-value server over TCP, the software under test of
//! `examples/own-program.toml` (a program a project builds with cargo and tests in VMs).
//!
//! ```text
//! kv serve ADDR            listen on ADDR (e.g. 0.0.0.0:7000), one thread per client
//! kv set ADDR KEY VALUE    store VALUE under KEY
//! kv get ADDR KEY          print KEY's value (exit 1 when there is none)
//! kv --version
//! ```
//!
//! The protocol is one line each way: `SET key value` -> `OK`, `GET key` -> `VALUE value`
//! or `MISSING`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

type Table = Arc<Mutex<HashMap<String, String>>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["--version"] => {
            println!("kv {}", env!("CARGO_PKG_VERSION"));
            Ok(true)
        }
        ["serve", addr] => serve(addr).map(|()| true),
        ["set", addr, key, value] => ask(addr, &format!("SET {key} {value}")).map(|r| r == "OK"),
        ["get", addr, key] => {
            ask(addr, &format!("GET {key}")).map(|reply| match reply.strip_prefix("VALUE ") {
                Some(value) => {
                    println!("{value}");
                    true
                }
                None => false,
            })
        }
        _ => {
            eprintln!(
                "usage: kv serve ADDR | kv set ADDR KEY VALUE | kv get ADDR KEY | kv --version"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kv: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(addr: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    eprintln!("kv: listening on {}", listener.local_addr()?);
    let table = Table::default();
    for stream in listener.incoming() {
        let (stream, table) = (stream?, table.clone());
        std::thread::spawn(move || {
            if let Err(e) = answer(stream, &table) {
                eprintln!("kv: client: {e}");
            }
        });
    }
    Ok(())
}

fn answer(stream: TcpStream, table: &Table) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let reply = match line.split_once(' ') {
            Some(("SET", rest)) => match rest.split_once(' ') {
                Some((key, value)) => {
                    table.lock().unwrap().insert(key.into(), value.into());
                    "OK".to_string()
                }
                None => "ERROR expected SET key value".to_string(),
            },
            Some(("GET", key)) => match table.lock().unwrap().get(key) {
                Some(value) => format!("VALUE {value}"),
                None => "MISSING".to_string(),
            },
            _ => format!("ERROR unknown request {line:?}"),
        };
        writeln!(writer, "{reply}")?;
    }
    Ok(())
}

fn ask(addr: &str, request: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    writeln!(stream, "{request}")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(reply.trim_end().to_string())
}
