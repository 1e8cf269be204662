// The list of open polls at /, from GET /api/polls, a page at a time.
"use strict";

const PAGE = 20;
const list = document.getElementById("polls");
const more = document.getElementById("more");
const status = document.getElementById("status");
let cursor = null;

function item(poll) {
  const li = document.createElement("li");
  const link = document.createElement("a");
  link.href = "/polls/" + encodeURIComponent(poll.id);
  link.textContent = poll.question; // text, never markup: questions come from admins' input
  const meta = document.createElement("span");
  meta.className = "meta";
  const created = new Date(poll.created_at).toLocaleString();
  meta.textContent = poll.options.length + " options · opened " + created;
  li.append(link, meta);
  return li;
}

async function load() {
  more.disabled = true;
  const query = new URLSearchParams({ limit: String(PAGE) });
  if (cursor) query.set("cursor", cursor);
  try {
    const response = await fetch("/api/polls?" + query);
    if (!response.ok) throw new Error("HTTP " + response.status);
    const page = await response.json();
    for (const poll of page.polls) list.append(item(poll));
    cursor = page.next_cursor;
    more.hidden = !cursor;
    status.textContent = list.children.length ? "" : "No poll is open right now.";
  } catch (error) {
    status.textContent = "The polls could not be loaded (" + error.message + "). Reload to try again.";
  } finally {
    more.disabled = false;
  }
}

more.addEventListener("click", load);
load();
