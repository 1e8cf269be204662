// A poll's voting page, phone first: the form to vote, what this browser
// voted, and the results, live from the SSE stream, with their history.
"use strict";

const { api, applyTheme, colour, getJson, listen, share, BallotsChart } = window.voteflow;
const pollId = decodeURIComponent(location.pathname.split("/").pop());
const $ = (id) => document.getElementById(id);
applyTheme();

let poll = null;
let total = 0;
let open = true;
let liveState = "connecting";
const rows = new Map(); // option id -> {li, fill, count}
const chart = new BallotsChart($("chart"), "Ballots");

function setStatus() {
  const status = $("status");
  if (!open) {
    status.dataset.state = "closed";
    status.textContent = "Closed · final results";
  } else if (liveState === "live") {
    status.dataset.state = "live";
    status.textContent = "Live";
  } else if (liveState === "down") {
    status.dataset.state = "down";
    status.textContent = "Disconnected, reconnecting…";
  }
}

function renderPoll() {
  document.title = poll.question + " · voteflow";
  $("question").textContent = poll.question; // text, never markup: it is an admin's input
  const multiple = poll.max_choices > 1;
  $("vote-legend").textContent = multiple
    ? "Your vote (up to " + poll.max_choices + " options)"
    : "Your vote";
  poll.options.forEach((option, index) => {
    const li = document.createElement("li");
    li.dataset.optionId = option.id;
    li.dataset.votes = "0";
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
    fill.style.background = colour(index);
    track.append(fill);
    li.append(label, track);
    $("bars").append(li);
    rows.set(option.id, { li, fill, count });

    const choice = document.createElement("label");
    choice.className = "choice";
    const input = document.createElement("input");
    input.type = multiple ? "checkbox" : "radio";
    input.name = "option";
    input.value = option.id;
    const text = document.createElement("span");
    text.textContent = option.label;
    choice.append(input, text);
    $("choices").append(choice);
  });
  $("shares").textContent = multiple
    ? "Percentages are shares of ballots: a ballot may name up to " + poll.max_choices +
      " options, so they can add up to more than 100%."
    : "Percentages are shares of ballots.";
  $("vote").hidden = false;
  $("vote").addEventListener("submit", vote);
  if (poll.closed) close();
  else if (poll.expires_at) {
    const left = Date.parse(poll.expires_at) - Date.now();
    // setTimeout holds at most about 24.8 days.
    if (left < 2 ** 31) setTimeout(close, Math.max(0, left));
  }
  showVoted();
}

function close() {
  open = false;
  $("vote-legend").textContent = "Voting has ended";
  $("cast").disabled = true;
  for (const input of document.querySelectorAll("input[name=option]")) input.disabled = true;
  if (!$("vote-result").textContent) $("vote-result").textContent = "This poll is closed.";
  setStatus();
}

function renderTally(tally) {
  total = tally.total_ballots;
  for (const option of tally.options) {
    const row = rows.get(option.id);
    if (!row) continue;
    const percent = share(option.votes, total);
    row.li.dataset.votes = String(option.votes);
    row.fill.style.width = Math.min(100, percent) + "%";
    row.count.textContent = option.votes.toLocaleString() + " · " + percent + "%";
  }
  $("total").textContent = total.toLocaleString() + (total === 1 ? " ballot" : " ballots");
  chart.add(Date.parse(tally.as_of) / 1000, total);
}

// What this browser voted on this poll, kept in this browser only: "You
// voted X" after a reload too, and the form starts from it.
const votedKey = "voteflow.voted." + pollId;

function showVoted() {
  const kept = JSON.parse(localStorage.getItem(votedKey) || "null");
  if (!kept || !poll) return;
  const labels = poll.options.filter((o) => kept.option_ids.includes(o.id)).map((o) => o.label);
  if (!labels.length) return;
  $("voted").hidden = false;
  $("voted").textContent = "You voted " + labels.join(", ") + ".";
  for (const input of document.querySelectorAll("input[name=option]")) {
    input.checked = kept.option_ids.includes(input.value);
  }
  // In a single-vote poll a later ballot replaces the earlier one; in a
  // multiple-vote poll every ballot counts.
  $("cast").textContent = poll.allow_multiple_votes ? "Vote again" : "Change my vote";
  if (open) {
    $("vote-legend").textContent = poll.allow_multiple_votes ? "Another vote" : "Change your vote";
  }
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

// The retry contract (docs/api.md, Retrying a vote): a ballot keeps its vote_id until the edge
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

async function vote(event) {
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
        localStorage.setItem(votedKey, JSON.stringify({ option_ids: chosen, at: Date.now() }));
        showVoted();
        result.dataset.state = "good";
        result.textContent = "Vote received. It shows in the results in a moment.";
      } else {
        result.dataset.state = "bad";
        result.textContent = "Not counted: " + (body.error || "HTTP " + response.status) + ".";
        // Closed meanwhile? Then the page says so, not only this answer.
        const now = await getJson(api(pollId)).catch(() => null);
        if (now && now.closed) close();
      }
    } else {
      // Still not known whether it was queued: Vote sends the same ballot again.
      result.dataset.state = "bad";
      result.textContent =
        "Not received yet (" + (error ? error.message : "HTTP " + response.status) + "). " +
        "Press Vote to try again: it is counted once however often it is sent.";
    }
  } finally {
    $("cast").disabled = !open;
  }
}

async function main() {
  try {
    poll = await getJson(api(pollId));
  } catch (error) {
    $("question").textContent = error.status === 404 ? "No such poll" : "The poll could not be loaded";
    $("status").textContent = "";
    return;
  }
  renderPoll();
  setStatus();
  listen(
    pollId,
    renderTally,
    (state) => {
      liveState = state;
      setStatus();
    },
  );
  chart.load(pollId, poll.created_at).catch(() => chart.draw());
}

main();
