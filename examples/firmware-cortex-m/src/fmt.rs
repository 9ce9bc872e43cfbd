//! The logging shim: `out!` prints a line as text over semihosting, or through defmt with the `defmt` feature
//! (formatted on the device, sent as one defmt string; decode with `defmt-print -e <elf>`). Never both.

#[cfg(not(feature = "defmt"))]
macro_rules! out {
    ($($arg:tt)*) => {
        cortex_m_semihosting::hprintln!($($arg)*)
    };
}

#[cfg(feature = "defmt")]
macro_rules! out {
    ($($arg:tt)*) => {
        defmt::println!("{}", defmt::Display2Format(&format_args!($($arg)*)))
    };
}
