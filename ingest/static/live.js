// What voteflow's pages share: the poll and its live tallies, its history as
// a chart, the option colours, and the theme. A classic script: each page
// loads it before its own, which finds it as window.voteflow.
"use strict";

window.voteflow = (() => {
  const api = (pollId, tail) =>
    "/api/polls/" + encodeURIComponent(pollId) + (tail ? "/" + tail : "");

  // The theme: ?theme=light or ?theme=dark wins, else the page's default
  // (data-theme on <html>, the presenter view's is dark), else the system's.
  function applyTheme() {
    const asked = new URLSearchParams(location.search).get("theme");
    const root = document.documentElement;
    if (asked === "light" || asked === "dark") root.dataset.theme = asked;
    else if (!root.dataset.theme) {
      root.dataset.theme = matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
    }
    return root.dataset.theme;
  }

  // Option i's colour, from the stylesheet (--option-0 .. --option-7 for the
  // theme in force): each has at least 3:1 contrast on the theme's background.
  const COLOURS = 8;
  function colour(index) {
    return getComputedStyle(document.documentElement)
      .getPropertyValue("--option-" + (index % COLOURS))
      .trim();
  }

  async function getJson(url) {
    const response = await fetch(url);
    if (!response.ok) {
      const error = new Error("HTTP " + response.status);
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  // The live tallies of a poll: onTally(tally) for each newer one, onState(
  // "live" | "down") as the stream comes and goes. EventSource reconnects by
  // itself when a stream ends (the edge ends each after
  // VOTEFLOW_LIVE_MAX_SECONDS) or drops, but gives up for good on an answer
  // other than 200: a 429 (this address holds its most live streams) or a 503
  // (the edge holds all it may). Then a new one is opened after a wait that
  // doubles up to a minute, with jitter so that a crowd spreads out. The first
  // event of every stream is the current tally: nothing is replayed or lost.
  const RELISTEN_FIRST = 5; // seconds
  const RELISTEN_MAX = 60;
  function listen(pollId, onTally, onState) {
    let version = -1;
    let wait = RELISTEN_FIRST;
    function open() {
      const source = new EventSource(api(pollId, "live"));
      source.addEventListener("tally", (event) => {
        wait = RELISTEN_FIRST;
        onState("live");
        const tally = JSON.parse(event.data);
        if (tally.version <= version) return; // an older tally, after a newer one
        version = tally.version;
        onTally(tally);
      });
      source.addEventListener("error", () => {
        onState("down");
        if (source.readyState === EventSource.CLOSED) {
          setTimeout(open, wait * (0.5 + Math.random() / 2) * 1000);
          wait = Math.min(RELISTEN_MAX, wait * 2);
        }
      });
    }
    open();
  }

  // "12 · 40%": an option's votes and its share of the counted ballots (on a
  // multiple-choice poll the shares add up to more than 100%).
  function share(votes, ballots) {
    return ballots ? Math.round((100 * votes) / ballots) : 0;
  }

  // The ballots counted over time, from the server's history then live: a
  // uPlot chart of cumulative ballots, one point per second. Live tallies may
  // arrive before the history: points are kept by second and drawn in order.
  class BallotsChart {
    constructor(element, label) {
      this.element = element;
      this.points = new Map(); // second -> ballots
      this.plot = null;
      this.label = label;
    }

    // `since`: the poll's created_at, where the curve starts from nothing
    // (a second before, so that votes of its first second are a point apart).
    async load(pollId, since) {
      if (since) this.add(Date.parse(since) / 1000 - 1, 0, false);
      const history = await getJson(api(pollId, "history"));
      for (const point of history.points) {
        this.add(Date.parse(point.t) / 1000, point.total_ballots, false);
      }
      this.draw();
    }

    add(seconds, ballots, redraw = true) {
      const second = Math.floor(seconds);
      this.points.set(second, Math.max(this.points.get(second) || 0, ballots));
      if (redraw) this.draw();
    }

    draw() {
      if (typeof uPlot === "undefined") return;
      // Until there are two points, a line has nothing to join: the chart
      // says so instead of drawing an empty frame.
      const times = [...this.points.keys()].sort((a, b) => a - b);
      this.element.dataset.points = String(times.length);
      const data = [times, times.map((t) => this.points.get(t))];
      const width = this.element.clientWidth || 600;
      const height = Math.max(120, Math.round(width / 4));
      if (this.plot) {
        this.plot.setData(data);
        if (Math.abs(this.plot.width - width) > 2) this.plot.setSize({ width, height });
        return;
      }
      const ink = getComputedStyle(document.documentElement).getPropertyValue("--ink").trim();
      const line = getComputedStyle(document.documentElement).getPropertyValue("--line").trim();
      const font = "14px system-ui, sans-serif";
      const axis = { stroke: ink, font, grid: { stroke: line }, ticks: { stroke: line } };
      // Whole seconds and up: the points are a second apart at the finest.
      // Whole ballots.
      const counts = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 1e6, 1e7];
      const steps = [1, 5, 10, 15, 30, 60, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];
      this.plot = new uPlot(
        {
          width,
          height,
          legend: { show: false },
          cursor: { show: false },
          scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
          axes: [{ ...axis, incrs: steps }, { ...axis, size: 70, incrs: counts }],
          series: [{}, { label: this.label, stroke: colour(0), width: 3, fill: null }],
        },
        data,
        this.element,
      );
      addEventListener("resize", () => this.draw());
    }
  }

  return { api, applyTheme, colour, getJson, listen, share, BallotsChart };
})();
