//! Deadlines in exported engine state. An `Instant` means nothing outside its process image, so
//! state is written relative to the `now` of the export and read back relative to the `now` of
//! the import (`Engine::export` / `Engine::import` set that base around serde).

use std::cell::Cell;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

thread_local! {
    static BASE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Run `f` (a serialisation or deserialisation) with instants relative to `now`.
pub fn with_base<R>(now: Instant, f: impl FnOnce() -> R) -> R {
    BASE.with(|b| b.set(Some(now)));
    let r = f();
    BASE.with(|b| b.set(None));
    r
}

fn base() -> Instant {
    BASE.with(|b| b.get()).expect("engine instants are (de)serialised only inside clock::with_base")
}

/// Signed nanoseconds from the base.
fn offset(t: Instant) -> i64 {
    let b = base();
    match t.checked_duration_since(b) {
        Some(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        None => -(b.duration_since(t).as_nanos().min(i64::MAX as u128) as i64),
    }
}

fn instant(nanos: i64) -> Instant {
    let b = base();
    let d = Duration::from_nanos(nanos.unsigned_abs());
    if nanos >= 0 {
        b + d
    } else {
        b.checked_sub(d).unwrap_or(b)
    }
}

pub mod at {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Instant, s: S) -> Result<S::Ok, S::Error> {
        offset(*t).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        i64::deserialize(d).map(instant)
    }
}

pub mod opt {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Option<Instant>, s: S) -> Result<S::Ok, S::Error> {
        t.map(offset).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Instant>, D::Error> {
        Option::<i64>::deserialize(d).map(|o| o.map(instant))
    }
}
