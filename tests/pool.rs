//! Replay tests for the claude pool: fair slot queue, eviction order, warm spares and memory.

mod support;

use std::time::Duration;

use support::*;
use synthesis::engine::{Input, Output, Signal, SpawnSpec};

const MIB: u64 = 1 << 20;

fn spawned(out: &[Output]) -> Option<SpawnSpec> {
    out.iter().find_map(|o| match o {
        Output::Spawn { spec, .. } => Some(spec.clone()),
        _ => None,
    })
}

fn spawned_uuid(out: &[Output]) -> Option<String> {
    spawned(out).map(|s| s.session_uuid)
}

/// The Claude session uuid of `key`, from the latest saved session map.
fn uuid_of(s: &Script, key: &str) -> String {
    let map = s.saved.last().expect("a saved map");
    map.iter().find(|r| r.key == key).unwrap_or_else(|| panic!("{key} not in {map:?}")).uuid.clone()
}

fn term(proc: u64) -> Output {
    Output::Signal { proc, signal: Signal::Term }
}

fn exited(proc: u64) -> Input {
    Input::Exited { proc, status: "signal 15".into() }
}

/// A session known from an earlier run (it resumes its own Claude session).
fn known(key: &str, uuid: &str) -> synthesis::engine::SessionRecord {
    synthesis::engine::SessionRecord {
        key: key.into(),
        uuid: uuid.into(),
        created: 1,
        last_used: 2,
        ..Default::default()
    }
}

fn memory(available: u64, groups: &[(u64, u64)]) -> Input {
    Input::Memory { available, groups: groups.to_vec() }
}

#[test]
fn an_evicted_session_coming_back_does_not_take_the_slot_of_the_session_that_waits() {
    let mut st = settings();
    st.max_processes = 1;
    let mut s = Script::new(st);
    s.input(chat(10, "a", "x", false));
    s.start_process(1, 7, 100, "t3");
    s.input(stop_hook(20, "t4", None));
    // b needs the only slot: a's idle claude is stopped for it, and b waits in line.
    assert_eq!(s.input(chat(11, "b", "x", false)), vec![term(1)]);
    // a comes back while its claude is still stopping: b was first, and nothing else can be
    // stopped, so a is told to retry.
    let out = s.input(chat(12, "a", "y", false));
    let (conn, status, body) = response(&out[0]);
    assert_eq!((conn, status, body["error"]["code"].as_str()), (12, 503, Some("pool_busy")));
    // a's claude exits: the slot goes to b, not to a.
    let out = s.input(exited(1));
    assert_eq!(spawned_uuid(&out), Some(uuid_of(&s, "b")), "{out:?}");
    assert_eq!(out.iter().filter(|o| matches!(o, Output::Spawn { .. })).count(), 1);
}

#[test]
fn waiters_get_slots_in_arrival_order_each_covered_by_one_eviction() {
    let mut st = settings();
    st.max_processes = 2;
    let mut s = Script::new(st);
    for (conn, key, proc, pid, bridge, bt, ht) in [(10, "a", 1, 7, 100, "t3", "t4"), (11, "b", 2, 8, 101, "t7", "t8")] {
        s.input(chat(conn, key, "x", false));
        s.start_process(proc, pid, bridge, bt);
        s.input(stop_hook(20, ht, None));
        s.advance(Duration::from_secs(1));
    }
    assert_eq!(s.input(chat(12, "c", "x", false)), vec![term(1)], "least recently used first");
    assert_eq!(s.input(chat(13, "d", "x", false)), vec![term(2)], "a second waiter, a second eviction");
    let e = s.input(chat(14, "e", "x", false));
    assert_eq!(response(&e[0]).1, 503, "no slot can come for a third");
    let first = s.input(exited(2));
    let second = s.input(exited(1));
    assert_eq!(spawned_uuid(&first), Some(uuid_of(&s, "c")), "c first");
    assert_eq!(spawned_uuid(&second), Some(uuid_of(&s, "d")), "then d");
}

#[test]
fn a_warm_spare_takes_a_new_sessions_first_turn_without_a_spawn_and_is_refilled() {
    let mut st = settings();
    st.spare_processes = 1;
    let mut s = Script::new(st);
    let spare = spawned(&s.advance(Duration::from_millis(1))).expect("a spare is started at once");
    s.start_process(1, 7, 100, &spare.bridge_token);
    // A new session: delivered straight to the spare, which is replaced in the background.
    let out = s.input(chat(10, "a", "hello", false));
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out.iter().any(|o| matches!(o, Output::Bridge { conn: 100, .. })), "delivered to the spare: {out:?}");
    assert!(spawned_uuid(&out).is_some_and(|u| u != spare.session_uuid), "a new spare: {out:?}");
    s.input(reply(100, "chat-1", "echo: hello"));
    let out = s.input(stop_hook(20, &spare.hook_token, None));
    assert_eq!(response(&out[1]).2["choices"][0]["message"]["content"], "echo: hello");
    let saved = s.saved.last().unwrap();
    assert_eq!(
        (saved[0].key.as_str(), saved[0].uuid.as_str()),
        ("a", spare.session_uuid.as_str()),
        "the spare's session"
    );
    assert_eq!(saved.len(), 1, "spares are never saved");
    // A restored session cannot use a spare (it must resume its own Claude session).
    s.engine.restore(vec![known("old", "old-uuid")]);
    assert_eq!(spawned_uuid(&s.input(chat(11, "old", "back", false))).as_deref(), Some("old-uuid"));
}

#[test]
fn a_spare_is_stopped_first_when_the_pool_is_full_and_never_by_the_idle_sweep() {
    let mut st = settings();
    st.max_processes = 2;
    st.spare_processes = 1;
    st.idle_timeout = Duration::from_secs(60);
    let mut s = Script::new(st);
    let spare = spawned(&s.advance(Duration::from_millis(1))).unwrap();
    s.start_process(1, 7, 100, &spare.bridge_token);
    s.engine.restore(vec![known("old", "old-uuid")]);
    let old = spawned(&s.input(chat(10, "old", "x", false))).unwrap();
    s.start_process(2, 8, 101, &old.bridge_token);
    s.input(stop_hook(20, &old.hook_token, None));
    let swept = s.advance(Duration::from_secs(600));
    assert!(swept.contains(&term(2)) && !swept.contains(&term(1)), "the idle sweep spares the spare: {swept:?}");
    s.input(exited(2));
    let old = spawned(&s.input(chat(11, "old", "y", false))).unwrap();
    s.start_process(3, 9, 102, &old.bridge_token);
    s.input(stop_hook(21, &old.hook_token, None));
    s.engine.restore(vec![known("other", "other-uuid")]);
    // The pool is full (the spare and an idle "old"); a restored session needs a slot: the
    // spare goes first.
    assert_eq!(s.input(chat(12, "other", "x", false)), vec![term(1)]);
    assert_eq!(spawned_uuid(&s.input(exited(1))).as_deref(), Some("other-uuid"));
}

#[test]
fn memory_under_the_floor_stops_idle_claudes_never_busy_ones_and_refuses_with_a_clear_error() {
    let mut st = settings();
    st.min_free_memory = 1024 * MIB;
    let mut s = Script::new(st);
    s.input(memory(4096 * MIB, &[]));
    s.input(chat(10, "idle", "x", false));
    s.start_process(1, 7, 100, "t3");
    s.input(stop_hook(20, "t4", None));
    s.input(chat(11, "busy", "sleep", false));
    s.start_process(2, 8, 101, "t7");
    // The host fills up: under the floor, the idle claude goes, the busy one stays.
    let out = s.input(memory(900 * MIB, &[(1, 300 * MIB), (2, 300 * MIB)]));
    assert_eq!(out, vec![term(1)]);
    assert_eq!(s.input(exited(1)), vec![Output::CloseBridge { conn: 100 }]);
    // Still short, and nothing idle: a new session gets a 503 that names memory.
    s.input(memory(950 * MIB, &[(2, 300 * MIB)]));
    let out = s.input(chat(12, "new", "x", false));
    let (_, status, body) = response(&out[0]);
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("insufficient_memory")));
    assert!(body["error"]["message"].as_str().unwrap().contains("min_free_memory"), "{body}");
    // Room again: a new session starts.
    s.input(memory(2048 * MIB, &[(2, 300 * MIB)]));
    assert!(spawned_uuid(&s.input(chat(13, "new", "x", false))).is_some());
}

#[test]
fn making_room_for_one_more_claude_stops_idle_ones_least_recently_used_first() {
    let mut st = settings();
    st.min_free_memory = 512 * MIB;
    let mut s = Script::new(st);
    s.input(memory(4096 * MIB, &[]));
    for (conn, key, proc, pid, bridge, bt, ht) in [(10, "a", 1, 7, 100, "t3", "t4"), (11, "b", 2, 8, 101, "t7", "t8")] {
        s.input(chat(conn, key, "x", false));
        s.start_process(proc, pid, bridge, bt);
        s.input(stop_hook(20, ht, None));
        s.advance(Duration::from_secs(1));
    }
    // 700 MiB available, the largest claude is 300 MiB: one more would leave 400 < 512.
    s.input(memory(700 * MIB, &[(1, 250 * MIB), (2, 300 * MIB)]));
    assert_eq!(s.input(chat(12, "c", "x", false)), vec![term(1)], "a, the least recently used, makes room");
    let out = s.input(exited(1));
    assert!(spawned_uuid(&out).is_some(), "a's 250 MiB freed: 950 - 300 >= 512: {out:?}");
}
