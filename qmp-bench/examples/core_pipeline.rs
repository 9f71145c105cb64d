//! Pipelined `query-version` through the core alone, on a blocking socket: no tasks, no channels.
//! What the core costs on its own in the harness's pipeline workload, a bound for what the
//! adapters can reach: `cargo run --release -p qmp-bench --example core_pipeline SOCKET N W`
//! against floodsrv. Prints the seconds the N commands took.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use qmp_proto::{Command, Connection, Output};
use serde::Deserialize;

#[derive(Deserialize)]
#[allow(dead_code)]
struct VersionInfo {
    qemu: Triple,
    package: String,
}
#[derive(Deserialize)]
#[allow(dead_code)]
struct Triple {
    major: u64,
    minor: u64,
    micro: u64,
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (n, w): (u64, u64) = (a[2].parse().unwrap(), a[3].parse().unwrap());
    let mut s = UnixStream::connect(&a[1]).unwrap();
    let mut conn = Connection::default();
    let mut buf = vec![0u8; 64 << 10];
    let pump = |conn: &mut Connection, s: &mut UnixStream, buf: &mut [u8]| {
        while let Some(t) = conn.poll_transmit() {
            let k = s.write(t.data).unwrap();
            conn.advance_transmit(k);
        }
        let k = s.read(buf).unwrap();
        conn.handle_input(&buf[..k]);
    };
    loop {
        pump(&mut conn, &mut s, &mut buf);
        if let Some(Output::Ready { .. }) = conn.poll_output() {
            break;
        }
    }
    while conn.poll_output().is_some() {}
    let start = Instant::now();
    let (mut sent, mut got) = (0u64, 0u64);
    while got < n {
        while sent < n && sent - got < w {
            conn.send(Command::new("query-version").arguments(&()).unwrap())
                .unwrap();
            sent += 1;
        }
        pump(&mut conn, &mut s, &mut buf);
        while let Some(out) = conn.poll_output() {
            if let Output::Response { result, .. } = out {
                let v: VersionInfo = result.unwrap().deserialize().unwrap();
                std::hint::black_box(v);
                got += 1;
            }
        }
    }
    println!("{:.3} s", start.elapsed().as_secs_f64());
}
