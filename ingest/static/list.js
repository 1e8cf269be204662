// The polls at /: the open ones, or the closed ones (/?state=closed), from
// GET /api/polls, a page at a time.
"use strict";

window.voteflow.applyTheme();
const PAGE = 20;
const state = new URLSearchParams(location.search).get("state") === "closed" ? "closed" : "open";
const list = document.getElementById("polls");
const more = document.getElementById("more");
const status = document.getElementById("status");
let cursor = null;

document.getElementById("heading").textContent = state === "open" ? "Open polls" : "Closed polls";
document.getElementById("tab-" + state).setAttribute("aria-current", "page");

function item(poll) {
  const li = document.createElement("li");
  const link = document.createElement("a");
  link.href = "/polls/" + encodeURIComponent(poll.id);
  link.textContent = poll.question; // text, never markup: questions come from admins' input
  const meta = document.createElement("span");
  meta.className = "meta";
  const created = new Date(poll.created_at).toLocaleString();
  const ballots = poll.total_ballots.toLocaleString() + (poll.total_ballots === 1 ? " ballot" : " ballots");
  meta.textContent = poll.options.length + " options · " + ballots + " · opened " + created;
  li.append(link, meta);
  return li;
}

async function load() {
  more.disabled = true;
  const query = new URLSearchParams({ state, limit: String(PAGE) });
  if (cursor) query.set("cursor", cursor);
  try {
    const response = await fetch("/api/polls?" + query);
    if (!response.ok) throw new Error("HTTP " + response.status);
    const page = await response.json();
    for (const poll of page.polls) list.append(item(poll));
    cursor = page.next_cursor;
    more.hidden = !cursor;
    status.textContent = list.children.length
      ? ""
      : state === "open" ? "No poll is open right now." : "No poll has closed yet.";
  } catch (error) {
    status.textContent = "The polls could not be loaded (" + error.message + "). Reload to try again.";
  } finally {
    more.disabled = false;
  }
}

more.addEventListener("click", load);
load();
