// The organizer's page at /admin: sign in with the admin token, create polls,
// list them all (open, closed, expired) with their ballots, close one, and
// hand out its share link, QR code, pages and exports.
//
// The token is kept in sessionStorage: this tab only, gone when it closes or
// on "Forget token"; never in localStorage, never in an address. Every admin
// call carries it as a bearer token; a 401 at any time signs the page out.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "voteflow.admin_token";
const PAGE = 20;
const MIN_OPTIONS = 2;
const MAX_OPTIONS = 64;
const MAX_LABEL = 200;
// The form's field for each field an API error names.
const FIELD_INPUTS = {
  question: "question",
  max_choices: "max_choices",
  options: null,
  allow_multiple_votes: null,
  expires_at: null,
};

voteflow.applyTheme();

let token = null;

// ---- The API -------------------------------------------------------------

function adminPost(path, body) {
  return fetch(path, {
    method: "POST",
    headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

// The API's error body, {"error", "field"}, or what can be said without one.
async function problemOf(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body;
  } catch {
    // not JSON: a proxy's page, say
  }
  return { error: "HTTP " + response.status };
}

// ---- Signing in and out --------------------------------------------------

function say(output, state, text) {
  output.dataset.state = state;
  output.textContent = text;
}

// Whether the edge takes `candidate` as the admin token: a poll is "created"
// from an empty body, which creates nothing. The edge checks the token
// first (401 for a wrong one), then the body (422: no question).
async function tokenProblem(candidate) {
  if (!/^[\x21-\x7e]+$/.test(candidate)) {
    return "An admin token is made of letters, digits and punctuation, without spaces.";
  }
  let response;
  try {
    response = await fetch("/api/polls", {
      method: "POST",
      headers: { Authorization: "Bearer " + candidate, "Content-Type": "application/json" },
      body: "{}",
    });
  } catch (error) {
    return "The edge could not be reached (" + error.message + "). Try again.";
  }
  if (response.status === 422) return null;
  if (response.status === 401) {
    return "Wrong token: the edge refused it (401). Check VOTEFLOW_ADMIN_TOKEN and try again.";
  }
  const problem = await problemOf(response);
  return "The token could not be checked: " + problem.error + " (" + response.status + ").";
}

function openDesk(candidate) {
  token = candidate;
  sessionStorage.setItem(TOKEN_KEY, candidate);
  $("token").value = "";
  say($("signin-result"), "", "");
  $("signin").hidden = true;
  $("desk").hidden = false;
  resetForm();
  loadPolls(true);
}

function signOut(message) {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("desk").hidden = true;
  $("polls").replaceChildren();
  $("signin").hidden = false;
  say($("signin-result"), message ? "bad" : "good", message || "Token forgotten in this tab.");
  $("token").focus();
}

$("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const candidate = $("token").value.trim();
  const button = $("signin-button");
  button.disabled = true;
  say($("signin-result"), "busy", "Checking the token…");
  try {
    const problem = await tokenProblem(candidate);
    if (problem) {
      say($("signin-result"), "bad", problem);
      $("token").setAttribute("aria-invalid", "true");
      $("token").select();
    } else {
      $("token").removeAttribute("aria-invalid");
      openDesk(candidate);
    }
  } finally {
    button.disabled = false;
  }
});

$("forget").addEventListener("click", () => signOut(null));

// ---- The new poll form ---------------------------------------------------

function optionInputs() {
  return [...$("options").querySelectorAll("input")];
}

// The options' accessible names follow their places; a field can be removed
// while more than two are left, and added up to the API's 64.
function renumber() {
  const items = [...$("options").children];
  items.forEach((li, index) => {
    li.querySelector("input").setAttribute("aria-label", "Option " + (index + 1));
    const remove = li.querySelector("button");
    remove.setAttribute("aria-label", "Remove option " + (index + 1));
    remove.hidden = items.length <= MIN_OPTIONS;
  });
  $("add-option").hidden = items.length >= MAX_OPTIONS;
}

function addOption() {
  if ($("options").children.length >= MAX_OPTIONS) return optionInputs().pop();
  const li = document.createElement("li");
  const input = document.createElement("input");
  input.type = "text";
  input.maxLength = MAX_LABEL;
  input.setAttribute("aria-describedby", "options-error");
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "secondary";
  remove.textContent = "Remove";
  remove.addEventListener("click", () => {
    const before = li.previousElementSibling || li.nextElementSibling;
    li.remove();
    renumber();
    (before ? before.querySelector("input") : $("add-option")).focus();
  });
  li.append(input, remove);
  $("options").append(li);
  renumber();
  return input;
}

$("add-option").addEventListener("click", () => addOption().focus());

// Show the closing time's input that goes with the choice made.
function showClosing() {
  const chosen = document.querySelector('input[name="closes"]:checked').value;
  $("closes-at-detail").hidden = chosen !== "at";
  $("closes-in-detail").hidden = chosen !== "in";
}
for (const radio of document.querySelectorAll('input[name="closes"]')) {
  radio.addEventListener("change", showClosing);
}

function resetForm() {
  $("create").reset();
  $("options").replaceChildren();
  for (let i = 0; i < MIN_OPTIONS; i += 1) addOption();
  showClosing();
  clearErrors();
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

// A moment as RFC 3339 with this browser's UTC offset at that moment:
// "2026-03-29T14:30:00+02:00".
function rfc3339(date) {
  const offset = -date.getTimezoneOffset();
  const sign = offset >= 0 ? "+" : "-";
  const abs = Math.abs(offset);
  return (
    pad(date.getFullYear(), 4) + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) +
    "T" + pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds()) +
    sign + pad(Math.floor(abs / 60)) + ":" + pad(abs % 60)
  );
}

class FormProblem extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

// expires_at from the "Closes" choice: null, a local date and time with the
// browser's offset, or now plus a number of minutes.
function expiresAt() {
  const chosen = document.querySelector('input[name="closes"]:checked').value;
  if (chosen === "at") {
    const value = $("closes-at").value;
    if (!value) throw new FormProblem("expires_at", "Choose the closing date and time.");
    return rfc3339(new Date(value)); // "YYYY-MM-DDTHH:MM" is read as local time
  }
  if (chosen === "in") {
    const minutes = Number($("closes-in").value);
    if (!Number.isInteger(minutes) || minutes < 1) {
      throw new FormProblem("expires_at", "Give the minutes as a whole number, 1 or more.");
    }
    return rfc3339(new Date(Date.now() + minutes * 60_000));
  }
  return null;
}

// The body of POST /api/polls. Empty option fields are left out; the rest
// (how many options, max_choices against them...) is the API's to judge.
function newPoll() {
  return {
    question: $("question").value.trim(),
    options: optionInputs()
      .map((input) => input.value.trim())
      .filter((label) => label !== ""),
    allow_multiple_votes: $("multiple").checked,
    max_choices: Number($("max_choices").value),
    expires_at: expiresAt(),
  };
}

function clearErrors() {
  for (const field of Object.keys(FIELD_INPUTS)) {
    const message = $(field + "-error");
    message.hidden = true;
    message.textContent = "";
  }
  for (const input of $("create").querySelectorAll("[aria-invalid]")) {
    input.removeAttribute("aria-invalid");
  }
  say($("create-result"), "", "");
}

// An error the API (or the form) named a field for, beside that field, and
// summed up under the button.
function showError(field, message) {
  say($("create-result"), "bad", "Not created: " + message);
  if (!(field in FIELD_INPUTS)) return;
  const beside = $(field + "-error");
  beside.textContent = message;
  beside.hidden = false;
  let input = FIELD_INPUTS[field] && $(FIELD_INPUTS[field]);
  if (field === "options") input = optionInputs()[0];
  if (field === "expires_at") {
    input = $("closes-at-detail").hidden ? $("closes-in") : $("closes-at");
    if ($("closes-at-detail").hidden && $("closes-in-detail").hidden) input = null;
  }
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

$("create").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  let body;
  try {
    body = newPoll();
  } catch (problem) {
    if (!(problem instanceof FormProblem)) throw problem;
    showError(problem.field, problem.message);
    return;
  }
  const button = $("create-button");
  button.disabled = true;
  say($("create-result"), "busy", "Creating the poll…");
  try {
    const response = await adminPost("/api/polls", body);
    if (response.status === 401) {
      signOut("The edge no longer takes this token (401). Sign in again.");
      return;
    }
    if (response.status !== 201) {
      const problem = await problemOf(response);
      showError(problem.field, problem.error);
      return;
    }
    const poll = await response.json();
    resetForm();
    say($("create-result"), "good", "Created: “" + poll.question + "”. It is first in the list.");
    await loadPolls(true);
  } catch (error) {
    say($("create-result"), "bad", "Not created: the edge could not be reached (" + error.message + ").");
  } finally {
    button.disabled = false;
  }
});

// ---- The list of polls ---------------------------------------------------

let cursor = null;
let generation = 0; // a refresh outdates the pages still on their way

function stateOf(poll) {
  if (poll.closed_at) return "closed";
  return poll.closed ? "expired" : "open";
}

const STATE_NAMES = { open: "Open", closed: "Closed", expired: "Expired" };

function when(iso) {
  return new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function plural(n, one, many) {
  return n + " " + (n === 1 ? one : many);
}

function link(href, text, download) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  if (download) a.setAttribute("download", "");
  return a;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // text, never markup: it is the admin's input
  return node;
}

function card(poll, ballots) {
  const state = stateOf(poll);
  const li = element("li", "admin-poll");
  li.dataset.pollId = poll.id;
  li.dataset.state = state;
  const headingId = "poll-" + poll.id;

  const body = element("div", "poll-body");
  const heading = element("h3", "", poll.question);
  heading.id = headingId;

  const meta = element("p", "poll-meta");
  const badge = element("span", "state", STATE_NAMES[state]);
  badge.dataset.state = state;
  const count = element("span", "ballots", plural(ballots, "ballot", "ballots"));
  const rules = poll.allow_multiple_votes ? "every vote counts" : "one vote per person";
  const choices = poll.max_choices > 1 ? ", up to " + poll.max_choices + " options a vote" : "";
  let timing = "created " + when(poll.created_at);
  if (state === "closed") timing = "closed " + when(poll.closed_at);
  else if (state === "expired") timing = "expired " + when(poll.expires_at);
  else if (poll.expires_at) timing = "closes " + when(poll.expires_at);
  meta.append(
    badge, " · ", count, " · ",
    plural(poll.options.length, "option", "options") + ", " + rules + choices + " · " + timing,
  );

  const links = element("p", "poll-links");
  links.append(
    link("/polls/" + encodeURIComponent(poll.id), "Voting page"),
    link("/polls/" + encodeURIComponent(poll.id) + "/present", "Presenter view"),
    link(voteflow.api(poll.id, "results.csv"), "Results CSV", true),
    link(voteflow.api(poll.id, "results.json"), "Results JSON", true),
  );

  const share = element("div", "share");
  const shareLabel = element("span", "share-label", "Share link");
  const shortUrl = element("a", "short-url", "…");
  const copy = element("button", "secondary copy", "Copy link");
  copy.type = "button";
  copy.disabled = true;
  copy.setAttribute("aria-describedby", headingId);
  const copied = element("span", "copied");
  copied.setAttribute("role", "status");
  share.append(shareLabel, shortUrl);
  fillShare(poll, shortUrl, copy, copied);

  const actions = element("div", "actions");
  actions.append(copy);
  body.append(heading, meta, links, share, actions);
  if (state === "open") {
    const { ask, panel } = closer(poll, li, ballots, headingId);
    actions.append(ask);
    body.append(panel);
  }
  actions.append(copied);

  const qr = document.createElement("img");
  qr.className = "qr";
  qr.src = voteflow.api(poll.id, "qr.svg");
  qr.alt = "QR code of the share link of “" + poll.question + "”";
  qr.width = 160;
  qr.height = 160;
  qr.loading = "lazy";

  li.append(body, qr);
  return li;
}

async function fillShare(poll, shortUrl, copy, copied) {
  try {
    const links = await voteflow.getJson(voteflow.api(poll.id, "share"));
    shortUrl.href = links.short_url;
    shortUrl.textContent = links.short_url;
    copy.disabled = false;
    copy.addEventListener("click", async () => {
      try {
        if (!navigator.clipboard) throw new Error("no clipboard");
        await navigator.clipboard.writeText(links.short_url);
        copied.textContent = "Copied";
      } catch {
        copied.textContent = "Could not copy: select the link and copy it";
      }
    });
  } catch (error) {
    shortUrl.textContent = "unavailable (" + error.message + ")";
  }
}

// "Close poll" asks once more before it closes: a closed poll takes no votes
// and cannot be opened again. The button goes among the poll's actions, the
// confirmation (and what came of it) in a panel under them.
function closer(poll, li, ballots, headingId) {
  const panel = element("div", "closer");
  const ask = element("button", "secondary", "Close poll…");
  ask.type = "button";
  ask.setAttribute("aria-describedby", headingId);
  const confirm = element("div", "confirm");
  confirm.hidden = true;
  const question = element("p", "", "Close this poll now? It takes no more votes, and cannot be reopened.");
  const yes = element("button", "danger", "Yes, close it");
  yes.type = "button";
  const no = element("button", "secondary", "Cancel");
  no.type = "button";
  const result = element("output");
  confirm.append(question, yes, no);
  panel.append(confirm, result);

  ask.addEventListener("click", () => {
    ask.hidden = true;
    confirm.hidden = false;
    no.focus();
  });
  no.addEventListener("click", () => {
    confirm.hidden = true;
    ask.hidden = false;
    ask.focus();
  });
  yes.addEventListener("click", async () => {
    yes.disabled = no.disabled = true;
    say(result, "busy", "Closing…");
    try {
      const response = await adminPost(voteflow.api(poll.id, "close"));
      if (response.status === 401) {
        signOut("The edge no longer takes this token (401). Sign in again.");
        return;
      }
      if (!response.ok) {
        const problem = await problemOf(response);
        say(result, "bad", "Not closed: " + problem.error);
        return;
      }
      const closed = card(await response.json(), ballots);
      li.replaceWith(closed);
      closed.querySelector("h3").setAttribute("tabindex", "-1");
      closed.querySelector("h3").focus();
      say($("list-status"), "good", "Closed: “" + poll.question + "”.");
    } catch (error) {
      say(result, "bad", "Not closed: the edge could not be reached (" + error.message + ").");
    } finally {
      yes.disabled = no.disabled = false;
    }
  });
  return { ask, panel };
}

async function loadPolls(fresh) {
  const mine = fresh ? ++generation : generation;
  if (fresh) cursor = null;
  const more = $("more");
  more.disabled = true;
  const query = new URLSearchParams({ state: "all", limit: String(PAGE) });
  if (cursor) query.set("cursor", cursor);
  try {
    const page = await voteflow.getJson("/api/polls?" + query);
    if (mine !== generation) return;
    if (fresh) $("polls").replaceChildren();
    for (const poll of page.polls) $("polls").append(card(poll, poll.total_ballots));
    cursor = page.next_cursor;
    more.hidden = !cursor;
    const shown = $("polls").children.length;
    say($("list-status"), "", shown ? "" : "No polls yet: the first one you create appears here.");
  } catch (error) {
    if (mine !== generation) return;
    say($("list-status"), "bad", "The polls could not be loaded (" + error.message + "). Try Refresh.");
  } finally {
    more.disabled = false;
  }
}

$("more").addEventListener("click", () => loadPolls(false));
$("refresh").addEventListener("click", () => {
  say($("list-status"), "busy", "Refreshing…");
  loadPolls(true);
});

// ---- Start ---------------------------------------------------------------

// A token this tab was given earlier is checked again: it may have changed.
(async () => {
  const kept = sessionStorage.getItem(TOKEN_KEY);
  if (!kept) {
    $("token").focus();
    return;
  }
  say($("signin-result"), "busy", "Checking the token kept in this tab…");
  const problem = await tokenProblem(kept);
  if (problem) signOut(problem);
  else openDesk(kept);
})();
