//! Host I/O: the MNIST reader against the bundled files and against every way a file can be broken,
//! atomic writes, and aligned host buffers.
#![cfg(feature = "std")]

use std::io::Write;
use std::path::{Path, PathBuf};

use mantissa::data::{self, DataErrorKind};
use mantissa::host::HostBuffer;
use mantissa::io::write_atomic;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// A raw IDX images file: magic 0x00000803, then count, rows, cols (big-endian u32), then pixels.
fn idx_images(count: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [data::IMAGES_MAGIC, count, rows, cols] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v.extend_from_slice(pixels);
    v
}

/// A raw IDX labels file: magic 0x00000801, count, labels.
fn idx_labels(labels: &[u8]) -> Vec<u8> {
    idx_labels_with_count(labels.len() as u32, labels)
}

fn idx_labels_with_count(count: u32, labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&data::LABELS_MAGIC.to_be_bytes());
    v.extend_from_slice(&count.to_be_bytes());
    v.extend_from_slice(labels);
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Three 2x3 images with labels 0, 7, 9.
fn tiny() -> (Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..18u8).map(|i| i * 15).collect();
    (idx_images(3, 2, 3, &pixels), idx_labels(&[0, 7, 9]))
}

/// Asserts that `msg` names `file` and contains every one of `needles`.
#[track_caller]
fn assert_msg(err: &data::DataError, file: &str, needles: &[&str]) {
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{file}: ")), "message does not start with the file name: {msg}");
    assert_eq!(err.file(), Path::new(file));
    for n in needles {
        assert!(msg.contains(n), "message lacks {n:?}: {msg}");
    }
}

#[test]
fn bundled_mnist_loads_with_documented_counts() {
    let m = data::load_bundled(&data_dir()).expect("bundled MNIST loads");
    assert_eq!((m.len(), m.rows, m.cols), (10_000, 28, 28));
    assert_eq!(m.images.len(), 10_000 * 28 * 28);
    // data/README.md
    assert_eq!(m.class_counts(), [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]);
    // Real digits: some ink in every image, background at 0.
    for i in [0, 4999, 9999] {
        let img = m.image(i).unwrap();
        assert!(img.iter().any(|&p| p > 128), "image {i} has no ink");
        assert_eq!(img[0], 0, "image {i} corner is not background");
    }

    let mut x = vec![-1.0f32; 28 * 28];
    m.image_f32(123, &mut x);
    assert!(x.iter().all(|&v| (0.0..=1.0).contains(&v)));
    for (f, &b) in x.iter().zip(m.image(123).unwrap()) {
        assert_eq!(*f, f32::from(b) / 255.0);
    }

    let first = m.image(8000).unwrap().to_vec();
    let label = m.label(8000).unwrap();
    let (train, test) = m.split(8000);
    assert_eq!((train.len(), test.len()), (8000, 2000));
    assert_eq!(train.images.len(), 8000 * 784);
    assert_eq!(test.images.len(), 2000 * 784);
    assert_eq!((test.image(0).unwrap(), test.label(0).unwrap()), (&first[..], label));
    assert_eq!((test.rows, test.cols), (28, 28));
}

#[test]
fn raw_and_gzip_parse_the_same() {
    let (img, lab) = tiny();
    let raw = data::parse_mnist("i", &img, "l", &lab).unwrap();
    let gz = data::parse_mnist("i.gz", &gzip(&img), "l.gz", &gzip(&lab)).unwrap();
    assert_eq!(raw, gz);
    assert_eq!((raw.len(), raw.rows, raw.cols, raw.pixels()), (3, 2, 3, 6));
    assert_eq!(raw.labels, [0, 7, 9]);
    let mut x = [0.0f32; 6];
    raw.image_f32(2, &mut x);
    assert_eq!(x, [180.0 / 255.0, 195.0 / 255.0, 210.0 / 255.0, 225.0 / 255.0, 240.0 / 255.0, 1.0]);
    assert_eq!(raw.image(3), None);
    assert_eq!(raw.label(3), None);

    // Concatenated gzip members read as one stream, as `zcat` does.
    let mut two = gzip(&lab[..5]);
    two.extend(gzip(&lab[5..]));
    assert_eq!(data::parse_idx_labels("l.gz", &two).unwrap(), [0, 7, 9]);
}

#[test]
#[should_panic(expected = "output holds 5 floats, an image has 2x3")]
fn image_f32_wrong_output_length_is_a_caller_bug() {
    let (img, lab) = tiny();
    let m = data::parse_mnist("i", &img, "l", &lab).unwrap();
    m.image_f32(0, &mut [0.0; 5]);
}

#[test]
fn split_clamps_and_keeps_order() {
    let (img, lab) = tiny();
    let m = data::parse_mnist("i", &img, "l", &lab).unwrap();
    let (a, b) = m.clone().split(1);
    assert_eq!((a.labels.as_slice(), b.labels.as_slice()), (&[0u8][..], &[7u8, 9][..]));
    assert_eq!(b.image(0).unwrap(), m.image(1).unwrap());
    let (a, b) = m.clone().split(99);
    assert_eq!((a.len(), b.len()), (3, 0));
    assert_eq!(a, m);
    let (a, b) = m.split(0);
    assert_eq!((a.len(), b.len(), a.rows, a.cols), (0, 3, 2, 3));
}

#[test]
fn truncated_gzip_is_a_gzip_error() {
    let (img, _) = tiny();
    let gz = gzip(&img);
    for cut in [gz.len() - 1, gz.len() - 8, gz.len() / 2, 11] {
        let e = data::parse_idx_images("d/images.gz", &gz[..cut]).unwrap_err();
        assert!(matches!(e.kind(), DataErrorKind::Gzip(_)), "cut {cut}: {e}");
        assert_msg(&e, "d/images.gz", &["gzip"]);
    }
    let e = data::parse_idx_images("d/images.gz", &gz[..gz.len() / 2]).unwrap_err();
    assert_msg(&e, "d/images.gz", &["truncated gzip stream"]);
}

#[test]
fn corrupt_gzip_is_a_gzip_error() {
    let (_, lab) = tiny();
    let mut gz = gzip(&lab);
    let n = gz.len();
    gz[n - 6] ^= 0xff; // inside the CRC32 of the trailer
    let e = data::parse_idx_labels("l.gz", &gz).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::Gzip(_)), "{e}");
    assert_msg(&e, "l.gz", &["corrupt gzip stream"]);

    // Junk after a complete member.
    let mut gz = gzip(&lab);
    gz.extend_from_slice(b"junk after the end");
    let e = data::parse_idx_labels("l.gz", &gz).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::Gzip(_)), "{e}");
}

#[test]
fn truncated_raw_idx_says_how_much_is_there() {
    let (img, lab) = tiny();
    // One whole image and 2 bytes of the next missing.
    let e = data::parse_idx_images("x/img", &img[..img.len() - 8]).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::Truncated { count: 3, item_bytes: 6, bytes: 10, .. }), "{e}");
    assert_msg(&e, "x/img", &["truncated: header says 3 images, file holds 1 and 4 of the 6 bytes of the next"]);

    let e = data::parse_idx_labels("x/lab", &lab[..lab.len() - 1]).unwrap_err();
    assert_msg(&e, "x/lab", &["truncated: header says 3 labels, file holds 2"]);
    assert!(!e.to_string().contains("of the next"), "{e}");

    // The same inside a well-formed gzip stream.
    let e = data::parse_idx_labels("x/lab.gz", &gzip(&lab[..lab.len() - 1])).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::Truncated { .. }), "{e}");

    // Cut inside the header.
    let e = data::parse_idx_images("x/img", &img[..10]).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::HeaderTooShort { needed: 16, found: 10 }), "{e}");
    assert_msg(&e, "x/img", &["too short for an IDX header: needs 16 bytes, file holds 10"]);
    let e = data::parse_idx_labels("x/lab", &[]).unwrap_err();
    assert_msg(&e, "x/lab", &["needs 8 bytes, file holds 0"]);
}

#[test]
fn documented_message_for_short_labels() {
    let labels = vec![3u8; 9990];
    let e =
        data::parse_idx_labels("data/mnist-10k-labels-idx1-ubyte.gz", &gzip(&idx_labels_with_count(10_000, &labels)))
            .unwrap_err();
    assert_eq!(
        e.to_string(),
        "data/mnist-10k-labels-idx1-ubyte.gz: truncated: header says 10000 labels, file holds 9990"
    );
}

#[test]
fn wrong_magic_is_named() {
    let (img, lab) = tiny();
    let mut bad = img.clone();
    bad[3] = 0x04;
    let e = data::parse_idx_images("img", &bad).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::BadMagic { expected: 0x803, found: 0x804 }), "{e}");
    assert_msg(&e, "img", &["wrong magic number 0x00000804, expected 0x00000803"]);

    // Swapped paths get a hint.
    let e = data::parse_idx_images("labels.gz", &gzip(&lab)).unwrap_err();
    assert_msg(&e, "labels.gz", &["expected 0x00000803", "IDX labels file", "swapped"]);
    let e = data::parse_idx_labels("images", &img).unwrap_err();
    assert_msg(&e, "images", &["wrong magic number 0x00000803, expected 0x00000801"]);
}

#[test]
fn label_out_of_range() {
    let e = data::parse_idx_labels("lab", &idx_labels(&[1, 2, 10, 3])).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::BadLabel { index: 2, value: 10 }), "{e}");
    assert_msg(&e, "lab", &["label 10 at index 2", "0..=9"]);
    let e = data::parse_idx_labels("lab.gz", &gzip(&idx_labels(&[255]))).unwrap_err();
    assert_msg(&e, "lab.gz", &["label 255 at index 0"]);
}

#[test]
fn image_and_label_counts_must_match() {
    let (img, _) = tiny();
    let e = data::parse_mnist("a/img.gz", &gzip(&img), "a/lab.gz", &gzip(&idx_labels(&[1, 2]))).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::CountMismatch { labels: 2, images: 3, .. }), "{e}");
    assert_msg(&e, "a/lab.gz", &["count mismatch: 2 labels, but a/img.gz holds 3 images"]);
}

#[test]
fn trailing_bytes_are_an_error() {
    let (mut img, mut lab) = tiny();
    img.extend_from_slice(&[0; 5]);
    let e = data::parse_idx_images("img", &img).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::TrailingBytes { count: 3, extra: 5, .. }), "{e}");
    assert_msg(&e, "img", &["5 trailing bytes after the 3 images the header declares"]);
    lab.push(4);
    let e = data::parse_idx_labels("lab.gz", &gzip(&lab)).unwrap_err();
    assert_msg(&e, "lab.gz", &["1 trailing bytes after the 3 labels"]);
}

#[test]
fn garbage_is_rejected_without_panicking() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let e = data::parse_idx_images("junk", b"this is not an idx file at all").unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::BadMagic { .. }), "{e}");
    assert_msg(&e, "junk", &["wrong magic number 0x74686973"]);
    let e = data::parse_idx_labels("junk.gz", &[0x1f, 0x8b, 1, 2, 3, 4, 5]).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::Gzip(_)), "{e}");

    let (img, lab) = tiny();
    let (gimg, glab) = (gzip(&img), gzip(&lab));
    for round in 0..2000 {
        // Random bytes, and valid files with random bytes flipped or cut short.
        let len = (next() % 64) as usize;
        let random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = data::parse_idx_images("r", &random);
        let _ = data::parse_idx_labels("r", &random);
        for base in [&img, &lab, &gimg, &glab] {
            let mut m = base.to_vec();
            let at = (next() as usize) % m.len();
            m[at] ^= 1 << (round % 8);
            m.truncate(m.len() - (next() as usize) % 3);
            if let Ok(l) = data::parse_idx_labels("m", &m) {
                assert!(l.iter().all(|&x| x < 10));
            }
            if let Ok(i) = data::parse_idx_images("m", &m) {
                assert_eq!(i.pixels.len(), i.count * i.rows * i.cols);
            }
        }
    }
}

#[test]
fn zero_and_huge_dimensions() {
    for (dims, what) in [((0, 2, 3), "images"), ((3, 0, 3), "rows"), ((3, 2, 0), "cols")] {
        let e = data::parse_idx_images("z", &idx_images(dims.0, dims.1, dims.2, &[])).unwrap_err();
        assert!(matches!(e.kind(), DataErrorKind::ZeroDimension { .. }), "{e}");
        assert_msg(&e, "z", &[&format!("header says 0 {what}")]);
    }
    let e = data::parse_idx_labels("z", &idx_labels(&[])).unwrap_err();
    assert_msg(&e, "z", &["header says 0 labels"]);

    // A lying header must neither allocate its claim nor overflow: u32::MAX^3 bytes.
    let e = data::parse_idx_images("huge", &idx_images(u32::MAX, u32::MAX, u32::MAX, &[1, 2, 3])).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::TooLarge { .. }), "{e}");
    assert_msg(&e, "huge", &["more than this machine can address"]);
    // Addressable but absent: 4e9 labels promised, 3 present.
    let e = data::parse_idx_labels("big", &idx_labels_with_count(u32::MAX, &[1, 2, 3])).unwrap_err();
    assert_msg(&e, "big", &["truncated: header says 4294967295 labels, file holds 3"]);
}

#[test]
fn missing_files_name_the_path() {
    let dir = scratch_dir("missing");
    let e = data::load_bundled(&dir).unwrap_err();
    assert!(matches!(e.kind(), DataErrorKind::Io(_)), "{e}");
    assert_eq!(e.file(), dir.join(data::BUNDLED_IMAGES));
    assert!(e.to_string().contains("cannot read"), "{e}");
    assert!(std::error::Error::source(&e).is_some());

    // From files on disk, raw and gzip mixed.
    let (img, lab) = tiny();
    std::fs::write(dir.join("img"), &img).unwrap();
    std::fs::write(dir.join("lab.gz"), gzip(&lab)).unwrap();
    let m = data::load_mnist(dir.join("img"), dir.join("lab.gz")).unwrap();
    assert_eq!(m.labels, [0, 7, 9]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fresh directory under the target dir, unique per test.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mantissa-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn write_atomic_creates_and_replaces() {
    let dir = scratch_dir("atomic");
    let p = dir.join("ckpt.bin");
    write_atomic(&p, b"first").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"first");
    write_atomic(&p, b"second, longer").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
    write_atomic(&p, b"").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"");
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_atomic(&p, b"third").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // Many writers in one process never collide on the temporary name.
    std::thread::scope(|s| {
        for t in 0..8 {
            let p = &p;
            s.spawn(move || {
                for _ in 0..20 {
                    write_atomic(p, format!("writer {t}").as_bytes()).unwrap();
                }
            });
        }
    });
    assert!(std::fs::read_to_string(&p).unwrap().starts_with("writer "));
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn write_atomic_failure_leaves_old_contents() {
    let dir = scratch_dir("atomic-fail");

    // Directory missing: error names the path, nothing is created.
    let p = dir.join("no-such-dir").join("ckpt.bin");
    let e = write_atomic(&p, b"x").unwrap_err();
    assert!(e.to_string().contains("no-such-dir/ckpt.bin"), "{e}");
    assert!(!dir.join("no-such-dir").exists());

    // The rename fails after the data is written (target is a non-empty directory): the target is
    // untouched and the temporary file is gone.
    let target = dir.join("occupied");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("inside"), b"old").unwrap();
    write_atomic(&target, b"new").unwrap_err();
    assert!(target.is_dir());
    assert_eq!(std::fs::read(target.join("inside")).unwrap(), b"old");
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));

    // A path with no file name.
    assert!(write_atomic(Path::new("/"), b"x").is_err());

    // Read-only directory with an existing file. Root ignores permissions, so only check when the
    // directory really refuses new files.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.join("ro");
        std::fs::create_dir(&ro).unwrap();
        let p = ro.join("ckpt.bin");
        std::fs::write(&p, b"old").unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let refuses = std::fs::File::create(ro.join("probe")).is_err();
        if refuses {
            assert!(write_atomic(&p, b"new").is_err());
            assert_eq!(std::fs::read(&p).unwrap(), b"old");
            assert!(leftovers(&ro).is_empty());
        } else {
            eprintln!("note: running with permission override (root); read-only directory case skipped");
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn host_buffer_is_aligned_zeroed_and_exact() {
    for n in [0usize, 1, 63, 64, 65, 1000, 4096, 100_003] {
        let mut b = HostBuffer::new(n).unwrap();
        assert_eq!(b.len(), n);
        assert_eq!(b.is_empty(), n == 0);
        assert_eq!(b.as_slice().len(), n);
        assert_eq!(b.as_mut_slice().len(), n);
        assert_eq!(b.as_ptr() as usize % HostBuffer::ALIGN, 0, "size {n}");
        assert_eq!(b.as_mut_slice().as_ptr() as usize % 64, 0, "size {n}");
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice().fill(0xab);
        assert!(b.iter().all(|&x| x == 0xab)); // through Deref
    }
    // f32 views of the arena need 4-byte alignment; 64 covers any SIMD width too.
    assert_eq!(HostBuffer::ALIGN, 64);
}

#[test]
fn host_buffer_too_large_is_an_error() {
    assert!(HostBuffer::new(usize::MAX).is_err());
    assert!(HostBuffer::new(isize::MAX as usize).is_err());
    // Representable, but no allocator will hand out 4 EiB: the allocation itself fails, as a value.
    #[cfg(target_pointer_width = "64")]
    assert!(HostBuffer::new(1 << 62).is_err());
}
