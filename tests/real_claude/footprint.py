#!/usr/bin/env python3
"""Memory and start-up of one conversation's claude: synthesis (interactive claude on a terminal,
with the synthesis channel) against OpenClaw's built-in way (one headless `claude -p` with
stream-json per conversation), both with the real Claude Code CLI against the scripted Anthropic
API in fake_anthropic.py, in an isolated, seeded HOME (as tests/real_claude.rs does).

usage: footprint.py --claude PATH [--synthesis PATH] [--mode both|synthesis|headless]
                    [--convs N] [--turns N] [--rounds N] [--env K=V ...] [--conf LINE ...]
                    [--claude-env K=V ...] [--user-settings JSON] [--json]

Figures, each the median over rounds (and conversations):
  rss/pss at ready   sum over /proc/*/smaps_rollup of the claude's session (claude, `synthesis
                     channel`, any children) right when synthesis logs "ready" (headless: after
                     its first answer)
  rss/pss after N    the same after N turns
  start -> ready     synthesis's "process N ready after X ms"
  start -> 1st API   claude's spawn to its first /v1/messages call
  first turn         a new conversation's first request, sent before claude exists
  warm p50           the following turns
  N convs            the sum for all conversations alive at once (after their turns)
`--env`/`--conf` go to synthesis (its environment reaches claude; config lines are appended),
`--claude-env` to both synthesis's claude and the headless one, for trying switches.
"""
import argparse
import http.client
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
API_KEY = "sk-ant-test-offline-key"
OFFLINE_ENV = {
    "ANTHROPIC_API_KEY": API_KEY,
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "CLAUDE_CODE_GB_DISK_CACHE_WHEN_TELEMETRY_OFF": "1",
}


def kv(items):
    return dict(i.split("=", 1) for i in items or [])


def group_memory(leader):
    """(rss_kb, pss_kb, {comm: rss_kb}) summed over every process in `leader`'s session."""
    rss = pss = 0
    parts = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) != leader:  # session id
                continue
            comm = stat.split("(", 1)[1].rsplit(")", 1)[0]
            with open(f"/proc/{pid}/smaps_rollup") as f:
                roll = dict(re.findall(r"^(\w+):\s+(\d+) kB", f.read(), re.M))
        except (OSError, IndexError, ValueError):
            continue
        r, p = int(roll.get("Rss", 0)), int(roll.get("Pss", 0))
        rss += r
        pss += p
        parts[comm] = parts.get(comm, 0) + r
    return rss, pss, parts


def seed_home(root, user_settings=None):
    home, ws = os.path.join(root, "home"), os.path.join(root, "ws")
    for d in (home, ws, os.path.join(root, "state")):
        os.makedirs(d, exist_ok=True)
    cfg = {
        "hasCompletedOnboarding": True,
        "theme": "dark",
        "customApiKeyResponses": {"approved": [API_KEY[-20:]], "rejected": []},
        "cachedGrowthBookFeatures": {"tengu_harbor": True, "tengu_harbor_permissions": True},
        "projects": {os.path.realpath(ws): {
            "hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True,
            "allowedTools": [], "mcpServers": {}}},
    }
    with open(os.path.join(home, ".claude.json"), "w") as f:
        json.dump(cfg, f)
    if user_settings:
        os.makedirs(os.path.join(home, ".claude"), exist_ok=True)
        with open(os.path.join(home, ".claude", "settings.json"), "w") as f:
            f.write(user_settings)
    return home, os.path.realpath(ws)


class FakeApi:
    def __init__(self, root):
        self.log = os.path.join(root, "api.jsonl")
        self.times = os.path.join(root, "api-times.jsonl")
        env = dict(os.environ, FAKE_ANTHROPIC_TIMES=self.times)
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_anthropic.py"), self.log],
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.port = int(self.proc.stdout.readline().split()[1])

    def calls(self):
        try:
            with open(self.times) as f:
                return [json.loads(line) for line in f if line.strip()]
        except OSError:
            return []

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def claude_env(api, home, extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTHESIS_", "CLAUDE", "ANTHROPIC"))}
    env.update(OFFLINE_ENV, HOME=home, ANTHROPIC_BASE_URL=f"http://127.0.0.1:{api.port}")
    env.update(extra)
    return env


class Synthesis:
    """A synthesis daemon whose stderr is read (with arrival times) by a thread."""

    def __init__(self, args, root, api, home, ws):
        conf = os.path.join(root, "synthesis.conf")
        with open(conf, "w") as f:
            f.write(f"listen = 127.0.0.1:0\nstate_dir = {root}/state\nworkspace = {ws}\n"
                    f"claude_command = {args.claude}\n" + "".join(line + "\n" for line in args.conf or []))
        env = claude_env(api, home, {**kv(args.claude_env), **kv(args.env)})
        env["RUST_LOG"] = "info"
        self.proc = subprocess.Popen([args.synthesis, "--config", conf], env=env, stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        self.events = {}  # process id -> {"pid", "spawned", "ready_ms", "ready_mem"}
        self.lock = threading.Lock()
        self.log = []
        self.timed = []  # (arrival time, line)
        threading.Thread(target=self.read, daemon=True).start()
        line = self.wait(lambda l: "listening on http://127.0.0.1:" in l)
        self.port = int(line.split("127.0.0.1:")[1].split()[0].strip("/"))

    def read(self):
        for line in self.proc.stderr:
            now = time.time()
            line = line.rstrip("\n")
            m = re.search(r"process (\d+) is claude pid (\d+)", line)
            if m:
                with self.lock:
                    self.events.setdefault(m[1], {}).update(pid=int(m[2]), spawned=now)
            m = re.search(r"process (\d+) ready after (\d+) ms", line)
            if m:
                with self.lock:
                    ev = self.events.setdefault(m[1], {})
                    ev["ready_ms"] = int(m[2])
                    pid = ev.get("pid")
                if pid:
                    mem = group_memory(pid)
                    with self.lock:
                        ev["ready_mem"] = mem
            self.log.append(line)
            self.timed.append((now, line))
            self.lines.put(line)

    def wait(self, pred, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if pred(line):
                return line
        raise RuntimeError("synthesis: timed out; log tail:\n" + "\n".join(self.log[-30:]))

    def chat(self, key, text, stream=False):
        """(seconds to the whole answer, seconds to the first content, answer text)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        body = json.dumps({"messages": [{"role": "user", "content": text}], "stream": stream})
        t = time.time()
        c.request("POST", "/v1/chat/completions", body, {"x-session-affinity": key, "content-type": "application/json"})
        r = c.getresponse()
        if not stream:
            data = json.loads(r.read())
            if r.status != 200:
                raise RuntimeError(f"turn failed: {r.status} {data}")
            return time.time() - t, None, data["choices"][0]["message"]["content"]
        first, text_out = None, ""
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:]).get("choices", [{}])[0].get("delta", {}).get("content")
            if delta:
                first = first or time.time() - t
                text_out += delta
        return time.time() - t, first, text_out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_synthesis(args, root, api, home, ws):
    d = Synthesis(args, root, api, home, ws)
    convs = []
    try:
        for i in range(args.convs):
            key = f"conv-{i}"
            n_calls = len(api.calls())
            first, _, answer = d.chat(key, f"hello {i}")
            assert answer == f"echo: hello {i}", answer
            with d.lock:
                ev = dict(d.events[str(i + 1)])
            calls = api.calls()[n_calls:]
            after_first = group_memory(ev["pid"])
            warm, tail = [], []
            for t in range(args.turns - 1):
                total, first_content, answer = d.chat(key, f"turn {t}", stream=True)
                assert answer == f"echo: turn {t}", answer
                warm.append(total)
                tail.append(total - first_content)
            convs.append({
                "pid": ev["pid"],
                "start_to_ready_ms": ev["ready_ms"],
                "start_to_first_api_ms": (calls[0]["t"] - ev["spawned"]) * 1000 if calls else None,
                "first_turn_s": first,
                "warm_p50_s": statistics.median(warm) if warm else None,
                "after_reply_p50_s": statistics.median(tail) if tail else None,
                "ready_mem": ev.get("ready_mem"),
                "first_turn_mem": after_first,
                "after_turns_mem": group_memory(ev["pid"]),
            })
        total = [group_memory(c["pid"]) for c in convs]
        return convs, (sum(m[0] for m in total), sum(m[1] for m in total))
    finally:
        d.stop()


class Headless:
    """OpenClaw's built-in way: one `claude -p` with stream-json in and out per conversation."""

    def __init__(self, args, api, home, ws):
        env = claude_env(api, home, kv(args.claude_env))
        env["TMPDIR"] = tempfile.mkdtemp(prefix="headless-tmp-")
        cmd = [args.claude, "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
               "--session-id", str(uuid.uuid4()), "--permission-mode", "default"]
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, cwd=ws, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)

    def turn(self, text):
        t = time.time()
        self.proc.stdin.write(json.dumps({"type": "user", "message": {"role": "user", "content": text}}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            msg = json.loads(line)
            if msg.get("type") == "result":
                return time.time() - t, msg.get("result")
        raise RuntimeError("headless claude exited")

    def stop(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_headless(args, api, home, ws):
    convs, procs = [], []
    try:
        for i in range(args.convs):
            n_calls = len(api.calls())
            h = Headless(args, api, home, ws)
            procs.append(h)
            _, answer = h.turn(f"hello {i}")
            first = time.time() - h.started  # from spawn, as a new conversation sees it
            assert answer == "ok", answer
            calls = api.calls()[n_calls:]
            mem_first = group_memory(h.proc.pid)
            warm = [h.turn(f"turn {t}")[0] for t in range(args.turns - 1)]
            convs.append({
                "pid": h.proc.pid,
                "start_to_ready_ms": None,
                "start_to_first_api_ms": (calls[0]["t"] - h.started) * 1000 if calls else None,
                "first_turn_s": first,
                "warm_p50_s": statistics.median(warm) if warm else None,
                "after_reply_p50_s": None,
                "ready_mem": mem_first,
                "first_turn_mem": mem_first,
                "after_turns_mem": group_memory(h.proc.pid),
            })
        total = [group_memory(c["pid"]) for c in convs]
        return convs, (sum(m[0] for m in total), sum(m[1] for m in total))
    finally:
        for h in procs:
            h.stop()


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summary(rounds):
    convs = [c for r in rounds for c in r[0]]
    mb = lambda kb: kb / 1024  # noqa: E731
    out = {
        "start_to_ready_ms": med(c["start_to_ready_ms"] for c in convs),
        "start_to_first_api_ms": med(c["start_to_first_api_ms"] for c in convs),
        "first_turn_s": med(c["first_turn_s"] for c in convs),
        "warm_p50_s": med(c["warm_p50_s"] for c in convs),
        "after_reply_p50_s": med(c["after_reply_p50_s"] for c in convs),
    }
    for k in ("ready_mem", "first_turn_mem", "after_turns_mem"):
        out[k + "_rss_mb"] = med(mb(c[k][0]) for c in convs if c[k])
        out[k + "_pss_mb"] = med(mb(c[k][1]) for c in convs if c[k])
    parts = {}
    for c in convs:
        for comm, kb in (c["after_turns_mem"] or (0, 0, {}))[2].items():
            parts.setdefault(comm, []).append(mb(kb))
    out["after_turns_rss_by_process_mb"] = {k: statistics.median(v) for k, v in parts.items()}
    out["all_convs_rss_mb"] = med(mb(r[1][0]) for r in rounds)
    out["all_convs_pss_mb"] = med(mb(r[1][1]) for r in rounds)
    return out


def show(name, s, args):
    f = lambda v, fmt: "-" if v is None else fmt.format(v)  # noqa: E731
    print(f"== {name} ({args.rounds} rounds x {args.convs} conversations x {args.turns} turns, medians)")
    print(f"  start -> ready            {f(s['start_to_ready_ms'], '{:.0f} ms')}")
    print(f"  start -> first API call   {f(s['start_to_first_api_ms'], '{:.0f} ms')}")
    print(f"  new conversation, 1st turn {f(s['first_turn_s'], '{:.2f} s')}")
    print(f"  warm turn p50             {f(s['warm_p50_s'], '{:.3f} s')}"
          f"   (after the reply: {f(s['after_reply_p50_s'], '{:.3f} s')})")
    for label, k in (("at ready", "ready_mem"), ("after 1st turn", "first_turn_mem"),
                     (f"after {args.turns} turns", "after_turns_mem")):
        print(f"  RSS / PSS {label:<16}{f(s[k + '_rss_mb'], '{:.0f}')} / {f(s[k + '_pss_mb'], '{:.0f}')} MB")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(s["after_turns_rss_by_process_mb"].items()))
    print(f"  RSS by process (MB)       {parts}")
    print(f"  {args.convs} conversations RSS / PSS {f(s['all_convs_rss_mb'], '{:.0f}')} / "
          f"{f(s['all_convs_pss_mb'], '{:.0f}')} MB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--claude", required=True)
    p.add_argument("--synthesis", default=os.path.join(HERE, "../../target/release/synthesis"))
    p.add_argument("--mode", choices=("both", "synthesis", "headless"), default="both")
    p.add_argument("--convs", type=int, default=1)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--env", action="append", help="K=V for synthesis (and so claude)")
    p.add_argument("--claude-env", action="append", help="K=V for every claude")
    p.add_argument("--conf", action="append", help="a synthesis.conf line")
    p.add_argument("--user-settings", help="JSON for ~/.claude/settings.json of the test HOME")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.claude, args.synthesis = os.path.abspath(args.claude), os.path.abspath(args.synthesis)
    results = {}
    for mode in ("synthesis", "headless"):
        if args.mode not in (mode, "both"):
            continue
        rounds = []
        for _ in range(args.rounds):
            root = tempfile.mkdtemp(prefix=f"footprint-{mode}-")
            home, ws = seed_home(root, args.user_settings)
            api = FakeApi(root)
            try:
                if mode == "synthesis":
                    rounds.append(run_synthesis(args, root, api, home, ws))
                else:
                    rounds.append(run_headless(args, api, home, ws))
            finally:
                api.stop()
                shutil.rmtree(root, ignore_errors=True)
        results[mode] = summary(rounds)
        if not args.json:
            show(mode, results[mode], args)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
