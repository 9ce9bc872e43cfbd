use core::arch::aarch64::*;
use core::arch::asm;

#[target_feature(enable = "fp16,fhm")]
unsafe fn fhm(a: *const u16, b: *const u16) -> [f32; 4] {
    let av = vreinterpretq_f16_u16(vld1q_u16(a));
    let bv = vreinterpretq_f16_u16(vld1q_u16(b));
    let r = vfmlalq_laneq_low_f16::<3>(vdupq_n_f32(0.0), av, bv);
    let r = vfmlalq_laneq_high_f16::<5>(r, av, bv);
    let mut o = [0f32; 4];
    vst1q_f32(o.as_mut_ptr(), r);
    o
}

#[target_feature(enable = "bf16")]
unsafe fn bf(a: uint16x8_t, b: uint16x8_t) -> [f32; 4] {
    let mut acc = vdupq_n_f32(0.0);
    asm!("bfmlalb {c:v}.4s, {b:v}.8h, {a:v}.h[1]", "bfmlalt {c:v}.4s, {b:v}.8h, {a:v}.h[2]",
         c = inout(vreg) acc, b = in(vreg) b, a = in(vreg_low16) a, options(pure, nomem, nostack));
    let mut o = [0f32; 4];
    vst1q_f32(o.as_mut_ptr(), acc);
    o
}

fn main() {
    println!("fp16 {} fhm {} bf16 {} i8mm {}", std::arch::is_aarch64_feature_detected!("fp16"), std::arch::is_aarch64_feature_detected!("fhm"), std::arch::is_aarch64_feature_detected!("bf16"), std::arch::is_aarch64_feature_detected!("i8mm"));
    let one = half_bits(1.0); let two = 0x4000u16;
    let a = [one, two, one, two, two, two, two, two];
    let b = [0u16, 0, 0, two, 0, one, 0, 0];
    if std::arch::is_aarch64_feature_detected!("fhm") { println!("{:?}", unsafe { fhm(a.as_ptr(), b.as_ptr()) }); }
    if std::arch::is_aarch64_feature_detected!("bf16") {
        let x: [u16; 8] = [0x3f80, 0x4000, 0x4040, 0x4080, 0x3f80, 0x3f80, 0x3f80, 0x3f80]; // 1 2 3 4 1 1 1 1
        let y: [u16; 8] = [0, 0x4000, 0x4040, 0, 0, 0, 0, 0];
        println!("{:?}", unsafe { bf(vld1q_u16(y.as_ptr()), vld1q_u16(x.as_ptr())) });
    }
}
fn half_bits(_x: f32) -> u16 { 0x3c00 }
