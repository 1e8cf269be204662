// The presenter view of a poll, for a projector: the question, a bar per
// option moving live, the total, a countdown to the poll's close, and a QR
// code of its short link for the room to vote with. It says "Closed" when the
// poll closes while shown, without a reload: at the end of the countdown, and
// by re-reading the poll every few seconds (a close by an admin is not in the
// tally stream; the edge answers GET /api/polls/{id} from its cache).
"use strict";

(() => {
  const vf = window.voteflow;
  const $ = (id) => document.getElementById(id);
  const pollId = decodeURIComponent(location.pathname.split("/").slice(-2)[0]);
  const POLL_EVERY = 5; // seconds between re-reads of the poll while it is open
  // The narrowest chart worth showing, and its shape (BallotsChart draws a
  // chart a quarter as high as it is wide).
  const CHART_MIN_HEIGHT = 120;
  const CHART_ASPECT = 4;

  let poll = null;
  let closed = false;
  let latest = null; // the newest tally shown
  let chart = null;
  let skewMs = 0; // the edge's clock minus this one's, when they differ by seconds
  const rows = new Map(); // option id -> {li, fill, count}

  vf.applyTheme();

  function setStatus(state, text) {
    $("status").dataset.state = state;
    $("status").textContent = text;
  }

  function plural(n, one, many) {
    return n.toLocaleString() + " " + (n === 1 ? one : many);
  }

  function renderPoll() {
    document.title = poll.question + " · voteflow";
    $("question").textContent = poll.question;
    const bars = $("bars");
    // Up to 4 options in large type, up to 8 smaller, more in two columns.
    const n = poll.options.length;
    bars.dataset.density = n <= 4 ? "roomy" : n <= 8 ? "compact" : "columns";
    poll.options.forEach((option, i) => {
      const li = document.createElement("li");
      li.dataset.optionId = option.id;
      li.dataset.votes = "0";
      const label = document.createElement("div");
      label.className = "present-label";
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = vf.colour(i);
      const name = document.createElement("span");
      name.className = "present-name";
      name.textContent = option.label;
      const count = document.createElement("span");
      count.className = "present-count";
      label.append(swatch, name, count);
      const track = document.createElement("div");
      track.className = "present-track";
      const fill = document.createElement("div");
      fill.className = "present-fill";
      fill.style.background = vf.colour(i);
      track.append(fill);
      li.append(label, track);
      bars.append(li);
      rows.set(option.id, { li, fill, count });
    });
    renderTally({ options: poll.options.map((o) => ({ id: o.id, votes: 0 })), total_ballots: 0 });
  }

  function renderTally(tally) {
    const ballots = tally.total_ballots;
    for (const option of tally.options) {
      const row = rows.get(option.id);
      if (!row) continue;
      const percent = vf.share(option.votes, ballots);
      row.li.dataset.votes = String(option.votes);
      row.fill.style.width = (ballots ? (100 * option.votes) / ballots : 0).toFixed(1) + "%";
      row.count.textContent = plural(option.votes, "vote", "votes") + " · " + percent + "%";
    }
    $("total").textContent = (closed ? "Final count: " : "") + plural(ballots, "ballot", "ballots");
    let note = "Percentages are of " + plural(ballots, "ballot", "ballots") + ".";
    if (poll.max_choices > 1) {
      note +=
        " A ballot may name up to " + poll.max_choices +
        " options, so they can add up to more than 100%.";
    }
    $("share-note").textContent = note;
  }

  function onTally(tally) {
    latest = tally;
    renderTally(tally);
    if (chart && tally.total_ballots > 0) {
      chart.add(Date.parse(tally.as_of) / 1000, tally.total_ballots);
    }
  }

  function onState(state) {
    if (closed) return; // "Closed" stays; the stream still brings late commits
    if (state === "live") setStatus("live", "Live");
    else setStatus("down", "Reconnecting…");
  }

  // The short link, large, and as a QR code that names it in its alt text.
  async function showShare() {
    const share = await vf.getJson(vf.api(pollId, "share"));
    const url = new URL(share.short_url);
    const qr = $("qr");
    qr.alt = "QR code for " + share.short_url;
    qr.src = share.qr_svg;
    const host = document.createElement("span");
    host.className = "short-host";
    host.textContent = url.host;
    const path = document.createElement("span");
    path.className = "short-path";
    path.textContent = url.pathname;
    $("short-url").replaceChildren(host, path);
  }

  // "4:59", or "1:04:59" an hour or more ahead; whole seconds, rounded up,
  // so that "0:00" is shown only once the poll has closed.
  function clock(ms) {
    const total = Math.max(0, Math.ceil(ms / 1000));
    const h = Math.floor(total / 3600);
    const m = Math.floor((total % 3600) / 60);
    const s = String(total % 60).padStart(2, "0");
    return h ? h + ":" + String(m).padStart(2, "0") + ":" + s : m + ":" + s;
  }

  function tick() {
    if (closed || !poll.expires_at) return;
    const left = Date.parse(poll.expires_at) - (Date.now() + skewMs);
    if (left <= 0) {
      markClosed();
      return;
    }
    $("countdown").hidden = false;
    $("countdown").textContent = "Closes in " + clock(left);
    setTimeout(tick, (left % 1000) + 20); // just after the next whole second
  }

  function markClosed() {
    if (closed) return;
    closed = true;
    document.body.dataset.state = "closed";
    setStatus("closed", "Closed");
    $("countdown").hidden = true;
    // Nobody can vote any more: the call to vote goes, the results take its room.
    $("join").hidden = true;
    $("results-title").textContent = "Final results";
    if (latest) renderTally(latest);
    fitChart();
    // The final count: votes received before the close may still be committing;
    // the live stream, still open, brings them too.
    vf.getJson(vf.api(pollId, "results")).then(onNewer, () => {});
  }

  function onNewer(tally) {
    if (!latest || tally.version > latest.version) onTally(tally);
  }

  async function readPoll() {
    const started = Date.now();
    const response = await fetch(vf.api(pollId));
    if (!response.ok) {
      const error = new Error("HTTP " + response.status);
      error.status = response.status;
      throw error;
    }
    // The edge's Date header is to the second: only a clock off by more than
    // that moves the countdown.
    const date = Date.parse(response.headers.get("Date") || "");
    if (!Number.isNaN(date)) {
      const skew = date + 500 - (started + Date.now()) / 2;
      skewMs = Math.abs(skew) > 1500 ? skew : 0;
    }
    return response.json();
  }

  // Re-read the poll until it is closed; a failed read is tried again later.
  async function watchClose() {
    if (closed) return;
    try {
      if ((await readPoll()).closed) markClosed();
    } catch {
      // The edge is away for a moment: the next read will tell.
    }
    if (!closed) setTimeout(watchClose, POLL_EVERY * 1000);
  }

  // The chart takes what room the bars leave: as wide as its column, or
  // narrower so that its height (a quarter of its width) fits; none at all
  // when too little is left.
  let captionHeight = 0;
  function fitChart() {
    const figure = $("chart-figure");
    const caption = figure.querySelector("figcaption");
    captionHeight = caption.offsetHeight || captionHeight;
    const room = figure.clientHeight - captionHeight;
    const fits = room >= CHART_MIN_HEIGHT;
    figure.dataset.fits = String(fits);
    if (!fits) return;
    $("chart").style.width = Math.min(figure.clientWidth, Math.floor(room * CHART_ASPECT)) + "px";
    if (chart) chart.draw();
  }

  function setUpFullscreen() {
    const button = $("fullscreen");
    if (!document.fullscreenEnabled) return;
    button.hidden = false;
    button.addEventListener("click", () => {
      if (document.fullscreenElement) document.exitFullscreen();
      else document.documentElement.requestFullscreen().catch(() => {});
    });
    document.addEventListener("fullscreenchange", () => {
      button.textContent = document.fullscreenElement ? "Exit full screen" : "Full screen";
    });
  }

  async function start() {
    setUpFullscreen();
    try {
      poll = await readPoll();
    } catch (error) {
      setStatus("down", error.status === 404 ? "No such poll" : "Could not load the poll");
      return;
    }
    renderPoll();
    if (poll.closed) markClosed();
    else {
      tick();
      setTimeout(watchClose, POLL_EVERY * 1000);
      showShare().catch(() => {
        $("short-url").textContent = "The voting link could not be loaded.";
      });
    }
    vf.listen(pollId, onTally, onState);
    // Registered before the chart's own: the chart's box is resized first.
    addEventListener("resize", fitChart);
    fitChart();
    chart = new vf.BallotsChart($("chart"), "Ballots");
    if (latest && latest.total_ballots > 0) {
      chart.add(Date.parse(latest.as_of) / 1000, latest.total_ballots, false);
    }
    try {
      await chart.load(pollId, poll.created_at); // the curve starts from nothing then
    } catch {
      chart.draw(); // the history is away: the curve starts with live tallies
    }
  }

  start();
})();
