//! Logging shim (as in embassy): `debug!`/`info!` forward to `defmt` with the `defmt` feature and compile to
//! nothing without it. The core never prints on its own otherwise.

#[cfg(feature = "defmt")]
#[allow(unused_macros)]
macro_rules! info {
    ($($t:tt)*) => { ::defmt::info!($($t)*) };
}
#[cfg(not(feature = "defmt"))]
#[allow(unused_macros)]
macro_rules! info {
    ($($t:tt)*) => {{}};
}

#[allow(unused_imports)]
pub(crate) use info;
