"""Open TensorBoard in headless Chromium, screenshot its views and report what each one shows.

A small Chrome DevTools Protocol driver (the `websockets` package's synchronous client, no selenium or
playwright): for each view (a URL fragment: timeseries, scalars, hparams, text, images, projector, ...) it
loads ``{base_url}/?_shot=N#{view}`` (a full page load per view), polls the page until the view has
rendered (or ``wait_s`` passes), saves ``tensorboard-{view}.png`` and returns facts gathered by JavaScript
that walks the DOM including open shadow roots (the Polymer dashboards) and same-origin iframes: the
visible text, counts of chart paths, ``line-chart`` elements, canvases, loaded images, table rows and
vaadin-grid cells, visible spinners, and the page title.

    .venv/bin/python scripts/tensorboard_browser.py LOGDIR --out DIR [--views timeseries,hparams,text,images,projector]

starts TensorBoard on LOGDIR itself (a free port unless --port), captures the views and prints one line per
view. From Python (e.g. a pytest test)::

    from scripts.tensorboard_browser import capture, tensorboard_server
    with tensorboard_server(logdir) as url:
        facts = capture(url, ["timeseries", "text"], out_dir)
    assert facts["text"]["rendered"], facts["text"]["text"][:500]

(`scripts` imports as a namespace package from the repository root, as it does under pytest.)

Routes (TensorBoard 2.21): ``#NAME`` for each plugin NAME in /data/plugins_listing, e.g. timeseries (the
Angular Time Series), scalars, images, text, hparams, graphs, distributions, histograms, custom_scalars,
pr_curves (Polymer custom elements with shadow DOM) and projector (an iframe plugin, walked too). A view
with no data shows "No ... data was found" and an unknown name "There’s no dashboard by the name of ...":
both are reported in ``empty`` and not rendered. Element counts are of elements laid out and visible
(CSS), not only those inside the viewport the screenshot shows.

The CLI exits 0 when every view rendered, 3 when one did not (its line says NOT RENDERED), 1 when chromium
or TensorBoard failed (one ``error:`` line, then the last lines of its output), 2 when one is missing.

Chromium: ``$CHROMIUM`` or the first of chromium, chromium-browser, google-chrome on PATH, started with
``--headless=new --no-sandbox --disable-gpu`` in a fresh profile. WebGL (the projector, Time Series' charts)
runs on SwiftShader, Chromium's CPU renderer: Chromium 150 falls back to it even with only --disable-gpu, but
that automatic fallback is deprecated, so WEBGL_ARGS asks for it explicitly (``--use-angle=swiftshader
--enable-unsafe-swiftshader``); the facts' ``webgl`` says which renderer the page got (None: no WebGL).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

from fedemb.os_processes import stop_group

try:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect
except ImportError:  # reported when a browser is started, so that --help and the checks still work
    connect = None
    ConnectionClosed = OSError

DEFAULT_VIEWS = ["timeseries", "hparams", "text", "images", "projector"]
TEXT_CAP = 20000

# What a view shows while it has nothing: "No text data was found.", "No graph definition files were found.",
# "No dashboards are active for the current data set.", "There’s no dashboard by the name of “foo”." ...
EMPTY_RE = re.compile(r"No [\w ]{1,40}? (?:data|files?) (?:was|were) found|No dashboards are active"
                      r"|no dashboard by the name of|Data could not be loaded")


def empty_message(text: str) -> str | None:
    """The first empty-state message (see EMPTY_RE) in a view's text, or None."""
    m = EMPTY_RE.search(text)
    return m.group(0) if m else None


# WebGL (the projector, Time Series' chart renderer) on SwiftShader, Chromium's CPU renderer; see the docstring
WEBGL_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"]


# chart elements: Time Series' line-chart (Angular), the Polymer dashboards' vz-* charts
CHART_TAGS = ("line-chart", "vz-line-chart2", "vz-line-chart", "vz-histogram-timeseries", "tf-pr-curve-card")


class BrowserError(RuntimeError):
    """Chromium, TensorBoard or the DevTools connection failed; the message says which."""


class BrowserGone(BrowserError):
    """The DevTools connection closed under us (chromium exited or crashed)."""


# ---------------------------------------------------------------------------------------------- DOM facts

FACTS_JS = r"""
(() => {
  const MAX = %(cap)d;
  const f = {title: document.title, url: location.href, text: "", text_chars: 0, paths: 0, line_charts: 0,
             canvases: 0, images: 0, rows: 0, grid_cells: 0, spinners: 0, shadow_roots: 0, iframes: 0,
             elements: 0, components: {}, ready_state: document.readyState};
  if (window.__tbshotWebgl === undefined) {
    window.__tbshotWebgl = null;
    try {
      const gl = document.createElement("canvas").getContext("webgl");
      if (gl) {
        const ext = gl.getExtension("WEBGL_debug_renderer_info");
        window.__tbshotWebgl = ext ? String(gl.getParameter(ext.UNMASKED_RENDERER_WEBGL)) : "yes";
        const lose = gl.getExtension("WEBGL_lose_context"); if (lose) lose.loseContext();
      }
    } catch (e) {}
  }
  f.webgl = window.__tbshotWebgl;
  const cache = new Map();
  const visible = (el) => {
    if (!el) return false;
    let v = cache.get(el);
    if (v === undefined) {
      v = el.checkVisibility ? el.checkVisibility({checkOpacity: true, checkVisibilityCSS: true})
                             : !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
      cache.set(el, v);
    }
    return v;
  };
  const SKIP = new Set(["SCRIPT", "STYLE", "TEMPLATE", "NOSCRIPT", "svg:style"]);
  const SPIN = "mat-spinner, mat-progress-spinner, mat-progress-bar, paper-spinner[active], " +
               "paper-spinner-lite[active], paper-progress[indeterminate]";
  const parts = [];
  let len = 0;
  const walk = (root, host) => {
    const w = document.createTreeWalker(root, NodeFilter.SHOW_ELEMENT | NodeFilter.SHOW_TEXT, {
      acceptNode: (n) => n.nodeType === 1 && SKIP.has(n.tagName) ? NodeFilter.FILTER_REJECT
                                                                  : NodeFilter.FILTER_ACCEPT});
    for (let n = w.nextNode(); n; n = w.nextNode()) {
      if (n.nodeType === 3) {
        if (len >= MAX) continue;
        const t = n.data.replace(/\s+/g, " ").trim();
        if (t && visible(n.parentElement || host)) { parts.push(t); len += t.length + 1; }
        continue;
      }
      f.elements++;
      const tag = n.localName;
      if (tag.includes("-") && visible(n)) f.components[tag] = (f.components[tag] || 0) + 1;
      if (tag === "path") { const s = n.ownerSVGElement; if (visible(s)) f.paths++; }
      else if (tag === "line-chart") { if (visible(n)) f.line_charts++; }
      else if (tag === "canvas") { if (n.width > 0 && n.height > 0 && visible(n)) f.canvases++; }
      else if (tag === "img") { if (n.complete && n.naturalWidth > 0 && visible(n)) f.images++; }
      else if (tag === "tr") { if (visible(n)) f.rows++; }
      else if (tag === "vaadin-grid-cell-content") { if (visible(n) && n.textContent.trim()) f.grid_cells++; }
      else if (tag === "iframe") {
        f.iframes++;
        try { if (n.contentDocument && n.contentDocument.documentElement)
                walk(n.contentDocument.documentElement, n); } catch (e) {}
      }
      if (n.matches(SPIN) && visible(n)) f.spinners++;
      if (n.shadowRoot) { f.shadow_roots++; walk(n.shadowRoot, n); }
    }
  };
  walk(document.documentElement, null);
  f.text = parts.join("\n").slice(0, MAX);
  f.text_chars = f.text.length;
  return f;
})()
"""


def default_rendered(view: str, facts: dict) -> bool:
    """Whether `view` shows its content: no "No ... data was found" state, no visible spinner, and the
    view's own content: Time Series a chart or image card, scalars a chart, images a loaded image, text a
    loaded text card (its table), hparams a session row below the grid's header, the projector its WebGL
    canvas with the point count; any other view a chart, image, canvas, table row or 600 chars of text."""
    text, comp = facts.get("text", ""), facts.get("components", {})
    if empty_message(text) or facts.get("spinners", 0):
        return False
    if view == "timeseries":
        return facts.get("line_charts", 0) + facts.get("images", 0) + comp.get("histogram-card", 0) > 0
    if view == "scalars":
        return comp.get("vz-line-chart2", 0) > 0 and facts.get("paths", 0) > 10
    if view == "images":
        return facts.get("images", 0) > 0
    if view == "text":
        return comp.get("tf-text-loader", 0) > 0 and facts.get("rows", 0) > 0
    if view == "hparams":
        return facts.get("rows", 0) >= 2
    if view == "projector":
        return facts.get("canvases", 0) > 0 and "Points:" in text and comp.get("vz-projector", 0) > 0
    return (facts.get("line_charts", 0) + facts.get("images", 0) + facts.get("canvases", 0) + facts.get("rows", 0)
            + sum(n for tag, n in comp.items() if "chart" in tag or "card" in tag) > 0
            or facts.get("text_chars", 0) > 600)


# ---------------------------------------------------------------------------------------------- CDP client


class _CDP:
    """One websocket to one page target: commands by id, events buffered until asked for."""

    def __init__(self, ws_url: str, timeout: float = 30):
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(ws_url, max_size=None, open_timeout=timeout, ping_interval=None))
        self.timeout = timeout
        self.events: deque[dict] = deque()
        self._id = 0
        self.chromium_log: Path | None = None  # set by chromium(): its output, and its process (group) id
        self.chromium_pid: int | None = None

    def close(self):
        with contextlib.suppress(Exception):
            self._stack.close()

    def _recv(self, deadline: float) -> dict | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return json.loads(self.ws.recv(timeout=left))
        except TimeoutError:
            return None
        except ConnectionClosed as e:
            raise BrowserGone(f"chromium closed the DevTools connection ({e})") from None

    def send(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        self._id += 1
        my_id = self._id
        try:
            self.ws.send(json.dumps({"id": my_id, "method": method, "params": params or {}}))
        except ConnectionClosed as e:
            raise BrowserGone(f"chromium closed the DevTools connection ({e})") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._recv(deadline)
            if msg is None:
                raise BrowserError(f"no answer to {method} in {timeout or self.timeout:.0f} s")
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error'].get('message')}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            while self.events:
                ev = self.events.popleft()
                if ev["method"] == method:
                    return ev.get("params", {})
            msg = self._recv(deadline)
            if msg is None:
                return None
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str, timeout: float | None = None):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, timeout)
        if "exceptionDetails" in res:
            det = res["exceptionDetails"]
            raise BrowserError(f"JavaScript error: {det.get('exception', {}).get('description') or det.get('text')}")
        return res.get("result", {}).get("value")


# ---------------------------------------------------------------------------------------------- Chromium


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env if (os.path.isfile(env) and os.access(env, os.X_OK)) else shutil.which(env)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, each indented, for an error message."""
    try:
        return "\n".join("  | " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen | None, grace: float = 3.0):
    """SIGTERM the process group `proc` leads (started with start_new_session=True), SIGKILL it after `grace`
    seconds if anything of it is left, and reap the leader."""
    if proc is None:
        return
    stop_group(proc.pid, grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


@contextlib.contextmanager
def chromium(size: tuple[int, int] = (1400, 1000), start_timeout: float = 30,
             extra_args: list[str] | None = None) -> Iterator[_CDP]:
    """Headless Chromium in a fresh profile; yields a CDP connection to its page. Chromium (its whole process
    group) is killed and the profile removed on the way out, also on error."""
    if connect is None:
        raise BrowserError("the websockets package (>= 13, for websockets.sync) is not installed")
    exe = find_chromium()
    if not exe:
        raise BrowserError("chromium not found (install Debian's `chromium` or set $CHROMIUM)")
    tmp = Path(tempfile.mkdtemp(prefix="tbshot-chromium-"))
    profile, log = tmp / "profile", tmp / "chromium.log"
    profile.mkdir()
    args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            *WEBGL_ARGS,
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-sync", "--metrics-recording-only",
            "--disable-dev-shm-usage", "--mute-audio",
            "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
            *(extra_args or []), "about:blank"]
    proc = None
    cdp = None
    try:
        with open(log, "wb") as logf:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)

        def fail(msg: str):
            tail = _tail(log)
            raise BrowserError(f"chromium {msg}" + (f"; its last output:\n{tail}" if tail else ""))

        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + start_timeout
        port = None
        while port is None:
            if port_file.exists():
                first = port_file.read_text().splitlines()
                if first and first[0].strip().isdigit():
                    port = int(first[0])
                    break
            if proc.poll() is not None:
                fail(f"exited with code {proc.returncode} before opening its DevTools port")
            if time.monotonic() > deadline:
                fail(f"did not write {port_file.name} in {start_timeout:.0f} s")
            time.sleep(0.05)

        base = f"http://127.0.0.1:{port}"
        ws_url = None
        while ws_url is None:
            try:
                with urllib.request.urlopen(f"{base}/json/list", timeout=5) as r:
                    targets = json.load(r)
                pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
                if pages:
                    ws_url = pages[0]["webSocketDebuggerUrl"]
                    break
                req = urllib.request.Request(f"{base}/json/new?about:blank", method="PUT")
                with urllib.request.urlopen(req, timeout=5) as r:
                    ws_url = json.load(r)["webSocketDebuggerUrl"]
            except (OSError, ValueError, KeyError):
                if proc.poll() is not None:
                    fail(f"exited with code {proc.returncode}")
                if time.monotonic() > deadline:
                    fail(f"gave no page target at {base}/json/list in {start_timeout:.0f} s")
                time.sleep(0.1)

        cdp = _CDP(ws_url)
        cdp.send("Page.enable")
        cdp.send("Runtime.enable")
        cdp.send("Emulation.setDeviceMetricsOverride",
                 {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})
        cdp.chromium_log, cdp.chromium_pid = log, proc.pid
        yield cdp
    except BrowserGone as e:
        proc.poll()
        tail = _tail(log)
        state = "is still running" if proc.returncode is None else f"exited with code {proc.returncode}"
        raise BrowserGone(f"{e}; chromium {state}" + (f"; its last output:\n{tail}" if tail else "")) from None
    finally:
        if cdp is not None:
            cdp.close()
        _kill_group(proc)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- capture

RenderedFn = Callable[[str, dict], bool]


def capture(base_url: str, views: list[str], out_dir: Path, wait_s: float = 20, size=(1400, 1000),
            rendered: RenderedFn | None = None, settle_s: float = 0.6, empty_settle_s: float = 3.0,
            poll_s: float = 0.2) -> dict[str, dict]:
    """Screenshot each TensorBoard view and report what it shows.

    For each view, loads ``{base_url}/?_shot=N#{view}`` (a full page load, so no state carries over from
    the view before), waits for the load event, then polls the DOM facts until ``rendered(view, facts)``
    (default: :func:`default_rendered`) holds and the facts (text length, element counts) have not changed
    for ``settle_s``; or the view has shown an empty state ("No ... data was found") unchanged for
    ``empty_settle_s`` (a dashboard does not look again before its 30 s reload); or ``wait_s`` passes. Then
    saves ``out_dir/tensorboard-{view}.png``. Returns {view: facts}: the facts gathered by FACTS_JS (text,
    text_chars, paths, line_charts, canvases, images, rows, grid_cells, spinners, components, webgl, title,
    url, ...) plus ``view``, ``rendered`` (bool), ``empty`` (the empty-state message or None), ``seconds``
    (time for the view, load included), ``screenshot`` (path or None) and ``error`` (str or None).
    """
    rendered = rendered or default_rendered
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_url = base_url.rstrip("/")
    js = FACTS_JS % {"cap": TEXT_CAP}
    results: dict[str, dict] = {}
    with chromium(size=size) as cdp:
        for i, view in enumerate(views):
            t0 = time.monotonic()
            deadline = t0 + wait_s
            cdp.events.clear()
            error = None
            nav = cdp.send("Page.navigate", {"url": f"{base_url}/?_shot={i}#{view}"})
            if nav.get("errorText"):
                error = f"navigation failed: {nav['errorText']}"
            elif cdp.wait_event("Page.loadEventFired", wait_s) is None:
                error = f"no load event in {wait_s:g} s"
            facts: dict = {}
            ok, empty = False, None
            stable_since, last_key = 0.0, None
            while error is None:
                try:
                    facts = cdp.evaluate(js, timeout=max(5.0, wait_s)) or {}
                except BrowserGone:
                    raise
                except BrowserError as e:  # e.g. the page's context went away under the evaluation
                    if time.monotonic() > deadline:
                        error = str(e)
                        break
                    time.sleep(poll_s)
                    continue
                ok = rendered(view, facts)
                empty = empty_message(facts.get("text", ""))
                key = (ok, empty, *(facts.get(k) for k in ("text_chars", "paths", "line_charts", "canvases",
                                                           "images", "rows", "grid_cells", "spinners", "elements")))
                now = time.monotonic()
                if key != last_key:
                    stable_since, last_key = now, key
                elif ok and now - stable_since >= settle_s or empty and now - stable_since >= empty_settle_s:
                    break
                if now > deadline:
                    break
                time.sleep(poll_s)
            shot: Path | None = out_dir / f"tensorboard-{view}.png"
            try:
                data = cdp.send("Page.captureScreenshot", {"format": "png"}, timeout=30)["data"]
                shot.write_bytes(base64.b64decode(data))
            except BrowserGone:
                raise
            except BrowserError as e:
                error = error or f"screenshot failed: {e}"
                shot = None
            comp = facts.get("components", {})
            results[view] = {**facts, "view": view, "rendered": bool(ok and error is None), "empty": empty,
                             "charts": sum(comp.get(t, 0) for t in CHART_TAGS),
                             "seconds": round(time.monotonic() - t0, 2),
                             "screenshot": str(shot) if shot else None, "error": error}
    return results


# ---------------------------------------------------------------------------------------------- TensorBoard


def _tensorboard_cmd() -> list[str] | None:
    exe = Path(sys.executable).parent / "tensorboard"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    if importlib.util.find_spec("tensorboard") is None:
        return None
    return [sys.executable, "-m", "tensorboard.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir, port: int = 0, timeout: float = 60, runs_timeout: float = 15,
                      extra_args: list[str] | None = None) -> tuple[str, Callable[[], None]]:
    """Start TensorBoard on `logdir` (127.0.0.1, a free port when port is 0); returns (url, stop). Waits until
    /data/plugins_listing answers, then up to `runs_timeout` s for /data/runs to list a run (an empty logdir
    is not an error). stop() kills its process group and removes its log."""
    cmd = _tensorboard_cmd()
    if cmd is None:
        raise BrowserError(f"tensorboard not found (no {Path(sys.executable).parent / 'tensorboard'}, "
                           "and `import tensorboard` fails)")
    port = port or free_port()
    tmp = Path(tempfile.mkdtemp(prefix="tbshot-tensorboard-"))
    log = tmp / "tensorboard.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*cmd, "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1",
                                 *(extra_args or [])], stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def stop():
        _kill_group(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    def get(path: str):
        with urllib.request.urlopen(url + path, timeout=5) as r:
            return json.load(r)

    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                get("/data/plugins_listing")
                break
            except (OSError, ValueError):
                pass
            if proc.poll() is not None:
                raise BrowserError(f"tensorboard exited with code {proc.returncode}; its last output:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise BrowserError(f"tensorboard did not answer at {url} in {timeout:.0f} s; "
                                   f"its last output:\n{_tail(log)}")
            time.sleep(0.2)
        deadline = time.monotonic() + runs_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if get("/data/runs"):
                    break
            time.sleep(0.2)
    except BaseException:
        stop()
        raise
    return url, stop


@contextlib.contextmanager
def tensorboard_server(logdir, port: int = 0, **kw) -> Iterator[str]:
    """start_tensorboard as a context manager: yields the base URL, stops TensorBoard on exit."""
    url, stop = start_tensorboard(logdir, port, **kw)
    try:
        yield url
    finally:
        stop()


# ---------------------------------------------------------------------------------------------- CLI


def summary_line(view: str, f: dict) -> str:
    status = "ok" if f.get("rendered") else "NOT RENDERED"
    line = (f"{view:<12} {status:<12} {f.get('seconds', 0):5.1f} s  text {f.get('text_chars', 0):>5} chars  "
            f"images {f.get('images', 0):>2}  charts {f.get('charts', 0):>2}  canvases {f.get('canvases', 0)}  "
            f"table rows {f.get('rows', 0)}")
    if f.get("empty"):
        line += f"  empty: {f['empty']!r}"
    if f.get("error"):
        line += f"  error: {f['error']}"
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logdir")
    ap.add_argument("--out", required=True, type=Path, help="folder for tensorboard-VIEW.png")
    ap.add_argument("--views", default=",".join(DEFAULT_VIEWS), help="comma-separated URL fragments")
    ap.add_argument("--port", type=int, default=0, help="TensorBoard's port (0: a free one)")
    ap.add_argument("--wait", type=float, default=20, help="seconds to wait for each view to render")
    ap.add_argument("--size", default="1400x1000", help="viewport WIDTHxHEIGHT")
    ap.add_argument("--json", type=Path, help="also write the facts (text included) to this file")
    a = ap.parse_args(argv)
    views = [v.strip() for v in a.views.split(",") if v.strip()]
    w, h = (int(x) for x in a.size.lower().split("x"))
    if not Path(a.logdir).is_dir():
        print(f"error: no log directory {a.logdir}", file=sys.stderr)
        return 2
    if find_chromium() is None:
        print("error: chromium not found (install Debian's `chromium` or set $CHROMIUM)", file=sys.stderr)
        return 2
    if _tensorboard_cmd() is None:
        print(f"error: tensorboard not found (no {Path(sys.executable).parent / 'tensorboard'}, and no tensorboard "
              f"package for {sys.executable})", file=sys.stderr)
        return 2
    if connect is None:
        print("error: the websockets package (>= 13, for websockets.sync) is not installed", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        with tensorboard_server(a.logdir, a.port) as url:
            t1 = time.monotonic()
            facts = capture(url, views, a.out, wait_s=a.wait, size=(w, h))
            t2 = time.monotonic()
    except BrowserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for view in views:
        print(summary_line(view, facts[view]))
    if a.json:
        a.json.write_text(json.dumps(facts, indent=1))
    print(f"{len(views)} views in {t2 - t1:.1f} s (chromium's start and stop included), "
          f"{time.monotonic() - t0:.1f} s with tensorboard's; screenshots in {a.out}")
    return 0 if all(f["rendered"] for f in facts.values()) else 3


if __name__ == "__main__":
    sys.exit(main())
