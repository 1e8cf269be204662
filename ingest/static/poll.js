// A poll's page: its tallies, live from the SSE stream, and a form to vote.
//
// The stream sends the whole current tally on connect and after every commit;
// after a drop, or the end of a stream's lifetime, the page reconnects and the
// first event is the current snapshot again, so nothing is replayed or lost.
"use strict";

const pollId = decodeURIComponent(location.pathname.split("/").pop());
const $ = (id) => document.getElementById(id);
const RATE_WINDOW = 300; // seconds shown by the votes-per-second line

let version = -1;
let total = 0;
const rows = new Map(); // option id -> {fill, count}
const perSecond = []; // ballots counted in each of the last RATE_WINDOW seconds
let lastTotal = null;

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function renderPoll(poll) {
  document.title = poll.question + " · voteflow";
  $("question").textContent = poll.question;
  const bars = $("bars");
  const choices = $("choices");
  const multiple = poll.max_choices > 1;
  $("vote-legend").textContent = multiple
    ? "Your vote (up to " + poll.max_choices + " options)"
    : "Your vote";
  for (const option of poll.options) {
    const li = document.createElement("li");
    li.dataset.optionId = option.id;
    const label = document.createElement("div");
    label.className = "bar-label";
    const name = document.createElement("span");
    name.textContent = option.label;
    const count = document.createElement("span");
    count.className = "bar-count";
    count.textContent = "0 · 0%";
    label.append(name, count);
    const track = document.createElement("div");
    track.className = "bar-track";
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    track.append(fill);
    li.append(label, track);
    bars.append(li);
    rows.set(option.id, { fill, count });

    const choice = document.createElement("label");
    const input = document.createElement("input");
    input.type = multiple ? "checkbox" : "radio";
    input.name = "option";
    input.value = option.id;
    choice.append(input, " ", option.label);
    choices.append(choice);
  }
  if (poll.closed) {
    $("vote-result").textContent = "This poll is closed.";
    $("cast").disabled = true;
  }
  $("vote").hidden = false;
  $("vote").addEventListener("submit", (event) => vote(event, poll));
}

function renderTally(tally) {
  if (tally.version <= version) return; // an older tally, after a newer one
  version = tally.version;
  total = tally.total_ballots;
  let counted = 0;
  for (const option of tally.options) counted += option.votes;
  for (const option of tally.options) {
    const row = rows.get(option.id);
    if (!row) continue;
    const share = counted ? (100 * option.votes) / counted : 0;
    row.fill.style.width = share.toFixed(1) + "%";
    row.count.textContent = option.votes.toLocaleString() + " · " + share.toFixed(0) + "%";
  }
  $("total").textContent =
    total.toLocaleString() + (total === 1 ? " ballot" : " ballots");
}

function drawRate() {
  const canvas = $("rate");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  const top = Math.max(1, ...perSecond);
  context.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--bar");
  context.lineWidth = 3;
  context.beginPath();
  perSecond.forEach((n, i) => {
    const x = width - (perSecond.length - 1 - i) * (width / (RATE_WINDOW - 1));
    const y = height - 4 - (n / top) * (height - 8);
    if (i === 0) context.moveTo(x, y);
    else context.lineTo(x, y);
  });
  context.stroke();
  context.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--muted");
  context.font = "24px system-ui, sans-serif";
  context.fillText("peak " + top.toLocaleString() + "/s", 8, 28);
}

function tick() {
  if (lastTotal !== null) perSecond.push(Math.max(0, total - lastTotal));
  lastTotal = total;
  if (perSecond.length > RATE_WINDOW) perSecond.shift();
  drawRate();
}

// EventSource reconnects by itself when a stream ends (the edge ends each one
// after VOTEFLOW_LIVE_MAX_SECONDS) or drops, but gives up for good on an answer
// other than 200: a 429 (this address holds its most live streams) or a 503
// (the edge holds all it may). The page then opens a new one itself, after a
// wait that doubles up to a minute, with jitter so that a crowd spreads out.
const RELISTEN_FIRST = 5; // seconds
const RELISTEN_MAX = 60;
let relistenWait = RELISTEN_FIRST;

function listen() {
  const source = new EventSource("/api/polls/" + encodeURIComponent(pollId) + "/live");
  source.addEventListener("open", () => setStatus("live", "Live"));
  source.addEventListener("tally", (event) => {
    relistenWait = RELISTEN_FIRST;
    setStatus("live", "Live");
    renderTally(JSON.parse(event.data));
  });
  source.addEventListener("error", () => {
    // EventSource retries by itself while the edge is away; say so meanwhile.
    setStatus("down", "Disconnected, reconnecting…");
    if (source.readyState === EventSource.CLOSED) {
      const wait = relistenWait * (0.5 + Math.random() / 2);
      relistenWait = Math.min(RELISTEN_MAX, relistenWait * 2);
      setTimeout(listen, wait * 1000);
    }
  });
}

function uuid4() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return [hex.slice(0, 8), hex.slice(8, 12), hex.slice(12, 16), hex.slice(16, 20), hex.slice(20)].join("-");
}

function voter() {
  // One browser, one voter: a random id kept in this browser only.
  let id = localStorage.getItem("voteflow.voter");
  if (!id) {
    id = "browser-" + uuid4();
    localStorage.setItem("voteflow.voter", id);
  }
  return id;
}

// A voter token from the app that sent its user here (docs/voter-tokens.md):
// the link ends in #voter_token=<JWT>. A fragment never reaches a server or
// its logs; the page keeps the token for this tab only and takes it out of
// the address bar, so that it is not bookmarked or shared with the link.
function voterToken() {
  const params = new URLSearchParams(location.hash.slice(1));
  const given = params.get("voter_token");
  if (given) {
    sessionStorage.setItem("voteflow.voter_token", given);
    params.delete("voter_token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  }
  return sessionStorage.getItem("voteflow.voter_token");
}
const token = voterToken();

// The retry contract (README, API): a ballot keeps its vote_id until the edge
// gives a definite answer (2xx or 4xx), and is sent again with it after a 503,
// another 5xx or a network error, so that a retry is never counted twice. A
// different choice is a new ballot with a new vote_id.
const MAX_ATTEMPTS = 5; // sends of one ballot per click of Vote
const MAX_WAIT = 30; // seconds: the longest Retry-After honoured
let pending = null; // {choice, vote_id} of a ballot not yet definitely answered

const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

function retryAfter(response, attempt) {
  // Retry-After in seconds when the edge gave one, else 1, 2, 4, 8 s.
  const given = response ? parseInt(response.headers.get("Retry-After"), 10) : NaN;
  const wait = Number.isFinite(given) && given >= 0 ? given : 2 ** (attempt - 1);
  return Math.min(MAX_WAIT, wait);
}

async function send(ballot, result) {
  // The answer to the ballot: a definite one, or the last of MAX_ATTEMPTS.
  let response = null;
  let error = null;
  for (let attempt = 1; attempt <= MAX_ATTEMPTS; attempt++) {
    if (attempt > 1) {
      const wait = retryAfter(response, attempt - 1);
      result.dataset.state = "busy";
      result.textContent = "Not received yet; sending it again in " + wait + " s…";
      await sleep(wait);
    }
    try {
      const headers = { "Content-Type": "application/json" };
      // With a token, the token names the voter (the ballot names none).
      if (token) headers.Authorization = "Bearer " + token;
      response = await fetch("/api/vote", {
        method: "POST",
        headers,
        body: JSON.stringify(ballot),
      });
      error = null;
      if (response.status < 500) break;
    } catch (caught) {
      response = null;
      error = caught;
    }
  }
  return { response, error };
}

async function vote(event, poll) {
  event.preventDefault();
  const result = $("vote-result");
  const chosen = Array.from(document.querySelectorAll("input[name=option]:checked"), (i) => i.value);
  if (chosen.length === 0 || chosen.length > poll.max_choices) {
    result.dataset.state = "bad";
    result.textContent = chosen.length
      ? "Choose at most " + poll.max_choices + " options."
      : "Choose an option first.";
    return;
  }
  $("cast").disabled = true;
  const choice = JSON.stringify([...chosen].sort());
  if (!pending || pending.choice !== choice) pending = { choice, vote_id: uuid4() };
  const ballot = { poll_id: poll.id, option_ids: chosen, vote_id: pending.vote_id };
  if (!token) ballot.voter_fingerprint = voter();
  try {
    const { response, error } = await send(ballot, result);
    if (response && response.status < 500) {
      pending = null; // a definite answer: the next ballot is a new one
      const body = await response.json().catch(() => ({}));
      if (response.status === 202) {
        result.dataset.state = "good";
        result.textContent = "Vote received. It shows in the results in a moment.";
      } else {
        result.dataset.state = "bad";
        result.textContent = "Not counted: " + (body.error || "HTTP " + response.status) + ".";
      }
    } else {
      // Still not known whether it was queued: Vote sends the same ballot again.
      result.dataset.state = "bad";
      result.textContent =
        "Not received yet (" + (error ? error.message : "HTTP " + response.status) + "). " +
        "Press Vote to try again: it is counted once however often it is sent.";
    }
  } finally {
    $("cast").disabled = poll.closed;
  }
}

async function main() {
  const response = await fetch("/api/polls/" + encodeURIComponent(pollId));
  if (!response.ok) {
    $("question").textContent = response.status === 404 ? "No such poll" : "The poll could not be loaded";
    setStatus("down", "");
    return;
  }
  renderPoll(await response.json());
  listen();
  setInterval(tick, 1000);
}

main();
