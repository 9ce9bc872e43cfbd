//! MNIST in the IDX format (LeCun's original layout), gzip-compressed or raw.
//!
//! Every malformed input is a [`DataError`] naming the file and what is wrong with it; nothing here
//! panics on file contents. Files are decompressed as a stream and read no further than the header
//! promises (plus a count of any trailing bytes), so a corrupt header cannot make us allocate more
//! than the file actually holds.
//!
//! ```no_run
//! let data = mantissa::data::load_bundled(std::path::Path::new("data"))?;
//! let (train, test) = data.split(8000);
//! let mut x = vec![0.0f32; train.rows * train.cols];
//! train.image_f32(0, &mut x); // pixels in [0, 1]
//! # Ok::<(), mantissa::data::DataError>(())
//! ```

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

/// File names of the 10,000-digit set in `data/` (see `data/README.md`).
pub const BUNDLED_IMAGES: &str = "mnist-10k-images-idx3-ubyte.gz";
pub const BUNDLED_LABELS: &str = "mnist-10k-labels-idx1-ubyte.gz";

/// Number of digit classes; every label is in `0..CLASSES`.
pub const CLASSES: usize = 10;

/// IDX magic: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
pub const LABELS_MAGIC: u32 = 0x0000_0801;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Largest up-front reservation made from a header's word (the rest grows as bytes really arrive).
const MAX_PREALLOC: usize = 64 << 20;

/// A labelled set of greyscale images, one byte per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mnist {
    /// images: (N, rows, cols), row-major, 0 = background, 255 = ink.
    pub images: Vec<u8>,
    /// labels: (N,), each in `0..CLASSES`.
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl Mnist {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels per image (`rows * cols`).
    pub fn pixels(&self) -> usize {
        self.rows * self.cols
    }

    /// The first `at` samples and the rest. `at` is clamped to `len()`, so asking for more than there
    /// is gives every sample to the first half and an empty second half.
    pub fn split(mut self, at: usize) -> (Mnist, Mnist) {
        let at = at.min(self.len());
        let rest = Mnist {
            images: self.images.split_off(at * self.pixels()),
            labels: self.labels.split_off(at),
            rows: self.rows,
            cols: self.cols,
        };
        (self, rest)
    }

    /// Image `i` as bytes, `None` past the end.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let p = self.pixels();
        self.images.get(i.checked_mul(p)?..i.checked_add(1)?.checked_mul(p)?)
    }

    /// Label of sample `i`, `None` past the end.
    pub fn label(&self, i: usize) -> Option<u8> {
        self.labels.get(i).copied()
    }

    /// Writes image `i` into `out` as f32 in `[0, 1]` (`byte / 255`).
    ///
    /// # Panics
    /// If `i >= len()` or `out.len() != rows * cols`, like slice indexing: a bug in the calling loop,
    /// not in any file. Use [`Mnist::image`] to check first.
    pub fn image_f32(&self, i: usize, out: &mut [f32]) {
        let Some(img) = self.image(i) else {
            panic!("Mnist::image_f32: sample {i} out of range ({} samples)", self.len());
        };
        assert_eq!(
            out.len(),
            img.len(),
            "Mnist::image_f32: output holds {} floats, an image has {}x{}",
            out.len(),
            self.rows,
            self.cols
        );
        for (o, &b) in out.iter_mut().zip(img) {
            *o = f32::from(b) / 255.0;
        }
    }

    /// How many samples of each class.
    pub fn class_counts(&self) -> [usize; CLASSES] {
        let mut counts = [0; CLASSES];
        for &l in &self.labels {
            // Labels are checked on load; a hand-built set with a bad label is simply not counted.
            if let Some(c) = counts.get_mut(usize::from(l)) {
                *c += 1;
            }
        }
        counts
    }
}

/// An image of `cols` columns averaged over 2x2 blocks (half the width and height), each block rounded to the
/// nearest grey level: `(a + b + c + d + 2) / 4`. The 14x14 digits of the firmware example come from here.
pub fn halve(img: &[u8], cols: usize) -> Vec<u8> {
    let (rows, side) = (img.len() / cols, cols / 2);
    let mut out = vec![0u8; (rows / 2) * side];
    for r in 0..rows / 2 {
        for c in 0..side {
            let at = |dr: usize, dc: usize| u32::from(img[(2 * r + dr) * cols + 2 * c + dc]);
            out[r * side + c] = ((at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1) + 2) / 4) as u8;
        }
    }
    out
}

/// The images of one IDX file, before they are paired with labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    /// (count, rows, cols), row-major.
    pub pixels: Vec<u8>,
}

/// A file that could not be loaded: which file, and what is wrong with it.
#[derive(Debug)]
pub struct DataError {
    file: PathBuf,
    kind: DataErrorKind,
}

/// What is wrong with a file. The `Display` of [`DataError`] spells it out with the numbers.
#[derive(Debug)]
#[non_exhaustive]
pub enum DataErrorKind {
    /// The file could not be opened or read.
    Io(io::Error),
    /// It starts like gzip (1f 8b) but does not decompress: corrupt, truncated, or trailing junk.
    Gzip(io::Error),
    /// Fewer bytes than an IDX header needs.
    HeaderTooShort { needed: usize, found: usize },
    /// The first four bytes are not the expected IDX magic.
    BadMagic { expected: u32, found: u32 },
    /// A dimension in the header is zero (`what`: "images", "labels", "rows", "cols").
    ZeroDimension { what: &'static str },
    /// The header's dimensions multiply past what this machine can address.
    TooLarge { count: usize, item_bytes: usize },
    /// The header promises `count` items of `item_bytes` each; the file ends after `bytes` of them.
    Truncated { what: &'static str, count: usize, item_bytes: usize, bytes: usize },
    /// `extra` bytes follow the `count` items the header promises.
    TrailingBytes { what: &'static str, count: usize, extra: u64 },
    /// A label outside `0..CLASSES`.
    BadLabel { index: usize, value: u8 },
    /// The images file and the labels file disagree on the number of samples.
    CountMismatch { labels: usize, images: usize, images_file: PathBuf },
}

impl DataError {
    fn new(file: impl Into<PathBuf>, kind: DataErrorKind) -> Self {
        DataError { file: file.into(), kind }
    }

    /// The file the error is about.
    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn kind(&self) -> &DataErrorKind {
        &self.kind
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        match &self.kind {
            DataErrorKind::Io(e) => write!(f, "cannot read: {e}"),
            DataErrorKind::Gzip(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                write!(f, "truncated gzip stream: {e}")
            }
            DataErrorKind::Gzip(e) => write!(f, "corrupt gzip stream: {e}"),
            DataErrorKind::HeaderTooShort { needed, found } => {
                write!(f, "too short for an IDX header: needs {needed} bytes, file holds {found}")
            }
            DataErrorKind::BadMagic { expected, found } => {
                write!(f, "wrong magic number 0x{found:08x}, expected 0x{expected:08x} ({})", kind_of(*expected))?;
                if *found == IMAGES_MAGIC || *found == LABELS_MAGIC {
                    write!(f, "; this is an {}: are the two paths swapped?", kind_of(*found))?;
                }
                Ok(())
            }
            DataErrorKind::ZeroDimension { what } => write!(f, "header says 0 {what}"),
            DataErrorKind::TooLarge { count, item_bytes } => {
                write!(f, "header says {count} items of {item_bytes} bytes, more than this machine can address")
            }
            DataErrorKind::Truncated { what, count, item_bytes, bytes } => {
                let whole = bytes / item_bytes;
                let partial = bytes % item_bytes;
                write!(f, "truncated: header says {count} {what}, file holds {whole}")?;
                if partial != 0 {
                    write!(f, " and {partial} of the {item_bytes} bytes of the next")?;
                }
                Ok(())
            }
            DataErrorKind::TrailingBytes { what, count, extra } => {
                write!(f, "{extra} trailing bytes after the {count} {what} the header declares")
            }
            DataErrorKind::BadLabel { index, value } => {
                write!(f, "label {value} at index {index} is not a digit (expected 0..={})", CLASSES - 1)
            }
            DataErrorKind::CountMismatch { labels, images, images_file } => {
                write!(f, "count mismatch: {labels} labels, but {} holds {images} images", images_file.display())
            }
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            DataErrorKind::Io(e) | DataErrorKind::Gzip(e) => Some(e),
            _ => None,
        }
    }
}

fn kind_of(magic: u32) -> &'static str {
    match magic {
        IMAGES_MAGIC => "IDX images file",
        LABELS_MAGIC => "IDX labels file",
        _ => "IDX file",
    }
}

/// Loads the 10,000-digit set bundled in `dir` (normally the repository's `data/`).
pub fn load_bundled(dir: &Path) -> Result<Mnist, DataError> {
    load_mnist(dir.join(BUNDLED_IMAGES), dir.join(BUNDLED_LABELS))
}

/// Loads an images file and a labels file (each gzip or raw IDX) and checks that they pair up.
/// The original 60k/10k MNIST files load too.
pub fn load_mnist(images_path: impl AsRef<Path>, labels_path: impl AsRef<Path>) -> Result<Mnist, DataError> {
    let (images_path, labels_path) = (images_path.as_ref(), labels_path.as_ref());
    let images = read_images(images_path, open(images_path)?)?;
    let labels = read_labels(labels_path, open(labels_path)?)?;
    pair(images, images_path, labels, labels_path)
}

/// Parses an IDX images file held in memory (gzip or raw); `name` is used in errors.
pub fn parse_idx_images(name: &str, bytes: &[u8]) -> Result<IdxImages, DataError> {
    read_images(Path::new(name), bytes)
}

/// Parses an IDX labels file held in memory (gzip or raw); `name` is used in errors.
pub fn parse_idx_labels(name: &str, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    read_labels(Path::new(name), bytes)
}

/// [`load_mnist`] for files held in memory.
pub fn parse_mnist(
    images_name: &str,
    images_bytes: &[u8],
    labels_name: &str,
    labels_bytes: &[u8],
) -> Result<Mnist, DataError> {
    let images = parse_idx_images(images_name, images_bytes)?;
    let labels = parse_idx_labels(labels_name, labels_bytes)?;
    pair(images, Path::new(images_name), labels, Path::new(labels_name))
}

fn pair(images: IdxImages, images_file: &Path, labels: Vec<u8>, labels_file: &Path) -> Result<Mnist, DataError> {
    if images.count != labels.len() {
        return Err(DataError::new(
            labels_file,
            DataErrorKind::CountMismatch {
                labels: labels.len(),
                images: images.count,
                images_file: images_file.into(),
            },
        ));
    }
    Ok(Mnist { images: images.pixels, labels, rows: images.rows, cols: images.cols })
}

fn open(path: &Path) -> Result<BufReader<File>, DataError> {
    File::open(path).map(BufReader::new).map_err(|e| DataError::new(path, DataErrorKind::Io(e)))
}

fn read_images(file: &Path, input: impl io::BufRead) -> Result<IdxImages, DataError> {
    let mut r = Source::new(file, input)?;
    let [count, rows, cols] = r.header::<3>(IMAGES_MAGIC, ["images", "rows", "cols"])?;
    let item_bytes = rows
        .checked_mul(cols)
        .ok_or_else(|| DataError::new(file, DataErrorKind::TooLarge { count, item_bytes: usize::MAX }))?;
    let pixels = r.body("images", count, item_bytes)?;
    Ok(IdxImages { count, rows, cols, pixels })
}

fn read_labels(file: &Path, input: impl io::BufRead) -> Result<Vec<u8>, DataError> {
    let mut r = Source::new(file, input)?;
    let [count] = r.header::<1>(LABELS_MAGIC, ["labels"])?;
    let labels = r.body("labels", count, 1)?;
    if let Some((index, &value)) = labels.iter().enumerate().find(|&(_, &l)| usize::from(l) >= CLASSES) {
        return Err(DataError::new(file, DataErrorKind::BadLabel { index, value }));
    }
    Ok(labels)
}

/// A decompressing (when the input starts with the gzip magic) reader that turns every read failure into
/// a [`DataError`] about `file`.
struct Source<'a> {
    file: &'a Path,
    reader: Box<dyn Read + 'a>,
    gzip: bool,
}

impl<'a> Source<'a> {
    fn new(file: &'a Path, mut input: impl io::BufRead + 'a) -> Result<Self, DataError> {
        let gzip = input.fill_buf().map_err(|e| DataError::new(file, DataErrorKind::Io(e)))?.starts_with(&GZIP_MAGIC);
        let reader: Box<dyn Read + 'a> = if gzip {
            // Multi-member, as `gzip` itself reads concatenated files; junk after the last member is an error.
            Box::new(flate2::bufread::MultiGzDecoder::new(input))
        } else {
            Box::new(input)
        };
        Ok(Source { file, reader, gzip })
    }

    fn err(&self, kind: DataErrorKind) -> DataError {
        DataError::new(self.file, kind)
    }

    fn read_err(&self, e: io::Error) -> DataError {
        self.err(if self.gzip { DataErrorKind::Gzip(e) } else { DataErrorKind::Io(e) })
    }

    /// Fills `buf` as far as the input goes; returns how many bytes that was.
    fn read_up_to(&mut self, buf: &mut [u8]) -> Result<usize, DataError> {
        let mut n = 0;
        while n < buf.len() {
            match self.reader.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_err(e)),
            }
        }
        Ok(n)
    }

    /// Reads the magic and `D` big-endian u32 dimensions; each must be non-zero.
    fn header<const D: usize>(&mut self, magic: u32, names: [&'static str; D]) -> Result<[usize; D], DataError> {
        let needed = 4 + 4 * D;
        let mut buf = [0u8; 16];
        let buf = &mut buf[..needed];
        let found = self.read_up_to(buf)?;
        // Check the magic first when we have it: "wrong magic" says more than "too short" about a stray file.
        if found >= 4 {
            let m = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if m != magic {
                return Err(self.err(DataErrorKind::BadMagic { expected: magic, found: m }));
            }
        }
        if found < needed {
            return Err(self.err(DataErrorKind::HeaderTooShort { needed, found }));
        }
        let mut dims = [0usize; D];
        for (i, d) in dims.iter_mut().enumerate() {
            let at = 4 + 4 * i;
            let v = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
            if v == 0 {
                return Err(self.err(DataErrorKind::ZeroDimension { what: names[i] }));
            }
            // u32 -> usize only fails on 16-bit targets; report it as too large rather than panic.
            *d = usize::try_from(v)
                .map_err(|_| self.err(DataErrorKind::TooLarge { count: usize::MAX, item_bytes: 1 }))?;
        }
        Ok(dims)
    }

    /// Reads exactly `count * item_bytes` bytes and checks that nothing follows.
    fn body(&mut self, what: &'static str, count: usize, item_bytes: usize) -> Result<Vec<u8>, DataError> {
        let total = count
            .checked_mul(item_bytes)
            .filter(|&t| t <= isize::MAX as usize)
            .ok_or_else(|| self.err(DataErrorKind::TooLarge { count, item_bytes }))?;
        let mut data = Vec::new();
        // Reserve what the header says only up to a bound: a lying header must not allocate gigabytes.
        if data.try_reserve_exact(total.min(MAX_PREALLOC)).is_err() {
            return Err(self.err(DataErrorKind::TooLarge { count, item_bytes }));
        }
        // u64 from usize cannot fail on any target Rust supports (pointers are at most 64 bits).
        let limit = u64::try_from(total).unwrap_or(u64::MAX);
        if let Err(e) = (&mut self.reader).take(limit).read_to_end(&mut data) {
            return Err(self.read_err(e));
        }
        if data.len() < total {
            return Err(self.err(DataErrorKind::Truncated { what, count, item_bytes, bytes: data.len() }));
        }
        let extra = io::copy(&mut self.reader, &mut io::sink()).map_err(|e| self.read_err(e))?;
        if extra != 0 {
            return Err(self.err(DataErrorKind::TrailingBytes { what, count, extra }));
        }
        Ok(data)
    }
}
