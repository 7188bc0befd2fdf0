// handoff console: times in the viewer's zone, and a chain's tree that grows as the chain runs.
"use strict";

function localTimes(root) {
  for (const t of root.querySelectorAll("time[datetime]")) {
    const when = new Date(t.getAttribute("datetime"));
    if (!isNaN(when)) {
      t.textContent = when.toLocaleString(undefined, {dateStyle: "medium", timeStyle: "medium"});
      t.title = t.getAttribute("datetime");
    }
  }
}

function followTree(tree) {
  const live = document.getElementById("live");
  let fetching = false, again = false, ended = false;
  async function refresh() {
    if (fetching) { again = true; return; }
    fetching = true;
    try {
      const answer = await fetch(tree.dataset.tree, {headers: {"Accept": "text/html"}, cache: "no-store"});
      if (answer.ok) {
        tree.innerHTML = await answer.text();  // rendered and escaped by the server
        localTimes(tree);
        tree.dataset.updates = String(Number(tree.dataset.updates || "0") + 1);
      }
    } finally {
      fetching = false;
      if (again) { again = false; refresh(); }
    }
  }
  const events = new EventSource(tree.dataset.events);
  events.onmessage = refresh;
  for (const kind of ["chain.started", "hop.scheduled", "hop.carried", "hop.fallback", "hop.progress", "hop.completed",
                      "hop.failed", "hop.refused", "hop.cancelled", "approval.awaited", "approval.decided",
                      "fanout.opened", "branch.ended", "join.started", "steering.received", "stop.requested"]) {
    events.addEventListener(kind, refresh);
  }
  events.addEventListener("chain.ended", () => {
    ended = true;
    events.close();
    if (live) live.textContent = "ended";
    refresh();
  });
  events.onerror = () => { if (!ended && live) live.textContent = "reconnecting…"; };
  events.onopen = () => { if (live) live.textContent = "live: the tree grows as the chain runs"; };
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  const tree = document.getElementById("tree");
  if (tree && tree.dataset.ended === "no") followTree(tree);
});
