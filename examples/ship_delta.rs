//! What shipping a state file as content-defined chunks costs against the file before it
//! (`elder serve --edit-log`): `cargo run --release --example ship_delta OLD NEW`, e.g. two
//! generations' experts files of one state. Prints the new file's size, the bytes and chunks a
//! leader uploads (those OLD lacks), and its chunk list's size.

use anyhow::{Context, Result};
use elder::serve::chunks::{self, ChunkIndex};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [old, new] = args.as_slice() else {
        anyhow::bail!("usage: ship_delta OLD_FILE NEW_FILE");
    };
    let read = |p: &str| std::fs::read(p).with_context(|| format!("reading {p}"));
    let (old, new) = (read(old)?, read(new)?);
    let t = std::time::Instant::now();
    let mut index = ChunkIndex::default();
    index.add_file(old);
    let cut = chunks::cut(&new);
    let secs = t.elapsed().as_secs_f64();
    let missing: Vec<_> = cut.iter().filter(|(d, _)| index.get(d).is_none()).collect();
    let new_bytes: usize = missing.iter().map(|(_, r)| r.len()).sum();
    println!(
        "new file {} bytes in {} chunks; to ship: {} bytes in {} chunks ({:.2}%); chunk list {} bytes; both files cut and hashed in {:.2} s",
        new.len(),
        cut.len(),
        new_bytes,
        missing.len(),
        100.0 * new_bytes as f64 / new.len().max(1) as f64,
        32 * cut.len(),
        secs
    );
    Ok(())
}
