//! Replays every file of `fuzz/corpus/<target>/` through the checking function its cargo-fuzz
//! target calls (`timezero::fault::fuzzing`), on the stable toolchain, so seeds and saved
//! regressions keep passing without cargo-fuzz.
//!
//! `TIMEZERO_WRITE_CORPUS=1 cargo test --test fuzz_corpus write_seed_corpus -- --ignored`
//! regenerates the seed files.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

use std::path::{Path, PathBuf};

use timezero::fault::fuzzing;
use timezero::fault::internals::format::{superblock_offset, Layout, Superblock};
use timezero::nbd::proto;

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 4] = [
    ("table_decode", fuzzing::check_table_decode),
    ("table_open", fuzzing::check_table_open),
    ("op_script", fuzzing::check_op_script),
    ("nbd_request", fuzzing::check_nbd),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(target)
}

#[test]
fn replay_fuzz_corpus() {
    let mut total = 0;
    for (target, check) in TARGETS {
        let mut files: Vec<_> = std::fs::read_dir(corpus_dir(target))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no corpus for {target}");
        for f in &files {
            let data = std::fs::read(f).unwrap();
            eprintln!("{target}: {}", f.display());
            check(&data);
        }
        println!("{target}: replayed {} inputs", files.len());
        total += files.len();
    }
    println!("replayed {total} corpus inputs");
}

/// The template table the `table_open` target splices over must open cleanly.
#[test]
fn template_table_opens() {
    let t = fuzzing::template_table();
    let mut whole = vec![0u8];
    whole.extend_from_slice(&t);
    fuzzing::check_table_open(&whole);
    // Resealing a valid image changes nothing.
    let mut r = t.clone();
    fuzzing::reseal(&mut r);
    assert!(r == t, "reseal changed a valid image");
}

fn write(target: &str, name: &str, data: &[u8]) {
    let d = corpus_dir(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), data).unwrap();
}

#[test]
#[ignore = "writes the seed corpus; run with TIMEZERO_WRITE_CORPUS=1"]
fn write_seed_corpus() {
    if std::env::var_os("TIMEZERO_WRITE_CORPUS").is_none() {
        return;
    }
    let t = fuzzing::template_table();
    let l = Layout {
        journal_bytes: 128 * 1024,
        checkpoint_bytes: 64 * 1024,
        log_bytes: 0,
    };
    // table_decode: a superblock, its checkpoint, a journal block and its entries.
    let sb_bytes = &t[..4096];
    write("table_decode", "superblock", sb_bytes);
    let sb = [0u32, 1]
        .iter()
        .filter_map(|&c| {
            let o = superblock_offset(c, t.len() as u64) as usize;
            Superblock::decode(&t[o..o + 4096]).ok()
        })
        .max_by_key(|s| s.generation)
        .unwrap();
    let c0 = l.checkpoint(sb.area) as usize;
    write(
        "table_decode",
        "checkpoint",
        &t[c0..c0 + sb.ckpt_len as usize],
    );
    let j = l.journal(0) as usize;
    for slot in 0..4 {
        let b = &t[j + slot * 512..j + (slot + 1) * 512];
        if b[..4] == *b"TZJB" {
            write("table_decode", &format!("block{slot}"), b);
            let n = u16::from_le_bytes([b[44], b[45]]) as usize;
            write("table_decode", &format!("entries{slot}"), &b[48..48 + n]);
        }
    }
    // table_open: the whole valid image, the template as is, a resealed patch.
    let mut whole = vec![0u8];
    whole.extend_from_slice(&t);
    write("table_open", "valid_image", &whole);
    write("table_open", "template", &[1]);
    let mut patch = vec![3u8];
    patch.extend_from_slice(&((c0 + 70) as u32).to_le_bytes());
    patch.extend_from_slice(&[2, 0xff, 0x7f]);
    write("table_open", "patched_resealed", &patch);
    write("table_open", "empty", &[]);
    // op_script: establish, writes, target writes, copies, reads, reopen, withdraw.
    let est = [0u8, 0, 1, 0, 0, 0, 5];
    let mut s = vec![0u8, 0];
    s.extend_from_slice(&est);
    s.extend_from_slice(&[1, 0, 0x10, 0x00, 0x00, 0x30, 9]); // source write
    s.extend_from_slice(&[3, 0, 0x00, 0x02, 0x00, 0x10, 4]); // target write
    s.extend_from_slice(&[4, 0, 0, 3]); // copy batch
    s.extend_from_slice(&[2, 0, 0, 0, 0xff, 0x7f]); // read
    s.extend_from_slice(&[6, 7]); // reopen, check
    s.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 3]); // big source write
    s.extend_from_slice(&[5, 0, 7]); // withdraw, check
    write("op_script", "basic", &s);
    let mut f = s.clone();
    f[0] = 1;
    f[1] = 12;
    write("op_script", "eio_once", &f);
    f[0] = 2;
    f[1] = 30;
    write("op_script", "eio_forever", &f);
    f[0] = 3;
    f[1] = 8;
    write("op_script", "fail_sync", &f);
    let mut two = vec![1u8, 60];
    two.extend_from_slice(&[0, 0, 1, 4, 0, 8, 3, 1, 2, 2]); // two extents
    two.extend_from_slice(&[0, 1, 2, 3, 0, 0, 2]); // nocopy, grain 8K
    two.extend_from_slice(&[1, 1, 0, 0, 0, 0x40, 1, 4, 1, 0, 8, 6, 7]);
    write("op_script", "two_sessions", &two);
    // nbd_request: request headers, option header, info request, greeting, error chunk.
    let req = proto::Request {
        flags: 0,
        command: proto::Command::Write,
        cookie: 7,
        offset: 4096,
        length: 512,
    };
    let mut r = req.encode().to_vec();
    r.extend_from_slice(&[0, 0, 1, 0, 16, 0, 9, 0, 0, 1, 0]);
    write("nbd_request", "request_write", &r);
    write("nbd_request", "greeting", &proto::encode_greeting());
    write(
        "nbd_request",
        "option",
        &proto::encode_option(proto::OPT_GO, b"abc"),
    );
    write(
        "nbd_request",
        "info_request",
        &proto::InfoRequest {
            name: "export".into(),
            infos: vec![0, 3],
        }
        .encode(),
    );
    write(
        "nbd_request",
        "error_chunk",
        &proto::ErrorChunk {
            errno: 5,
            message: "bad".into(),
            offset: Some(9),
        }
        .encode(1)[proto::STRUCTURED_REPLY_HEADER_BYTES..],
    );
}
