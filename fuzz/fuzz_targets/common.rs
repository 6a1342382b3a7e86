//! Shared by the fuzz targets.

/// edgebridge guards some third-party parsers with `catch_unwind` (a panic there becomes
/// an error of that input). libfuzzer-sys's panic hook aborts before the unwind reaches
/// the guard, so it would report those handled panics as crashes: the default hook is put
/// back once. A panic that escapes edgebridge still aborts the run (libfuzzer-sys catches
/// it at the target's edge).
pub fn quiet_caught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| drop(std::panic::take_hook()));
}
