// healer's on-call console: polls the JSON API and renders what it answers. No framework, no build.
// Every value from the API is put on the page as text (textContent, text nodes), never as markup.
"use strict";

(() => {
  const settings = JSON.parse(document.getElementById("console-settings").textContent);
  const POLL_MS = (settings.pollSeconds || 2) * 1000;
  const OUTPUT_LIMIT = 2000;
  // The newest steps read each poll, for approvals, firing and recent episodes. The API cannot yet list
  // steps by state (awaiting_approval) or open episodes alone, so a step older than these is not seen.
  const STEPS_LIMIT = 50;
  // Rows of the Audit section: a screenful for the night shift; the API has the rest (?limit=).
  const AUDIT_LIMIT = 20;
  // Steps whose approval or rejection is read at most per poll (each is one request, then remembered).
  const DECISIONS_PER_POLL = 5;

  // --- Access control integration point -------------------------------------------------------
  // The server renders the session's CSRF token into <meta name="healer-csrf-token"> (empty when no
  // credentials are configured); every POST and DELETE sends it back as X-CSRF-Token. Requests carry
  // the browser's own credentials (session cookie, basic auth) with credentials: "same-origin".
  function csrfToken() {
    const meta = document.querySelector('meta[name="healer-csrf-token"]');
    return meta ? meta.content : "";
  }
  const canOperate = settings.canOperate !== false;
  // ------------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (method !== "GET") {
      const token = csrfToken();
      if (token) headers["X-CSRF-Token"] = token;
      if (body !== undefined) {
        headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
    }
    const response = await fetch(path, init);
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (response.status === 401 && settings.session) {
      // The session has expired or was ended: log in again.
      window.location.assign("/login");
    }
    if (!response.ok) {
      const message = data && data.error ? data.error : response.statusText;
      throw new ApiError(response.status, `${response.status}: ${message}`);
    }
    return data;
  }

  // h("p", {class: "x"}, "text", child): an element; strings become text nodes, null is skipped.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "value") el.value = value;
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function replace(el, ...children) {
    el.replaceChildren();
    append(el, children);
  }

  const byId = (id) => document.getElementById(id);

  // --- Formatting ---------------------------------------------------------------------------------
  function clock(epoch) {
    if (epoch === null || epoch === undefined) return "—";
    const d = new Date(epoch * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    const today = new Date();
    const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    if (d.toDateString() === today.toDateString()) return time;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
  }

  function seconds(value) {
    if (value === null || value === undefined) return "n/a";
    if (value < 1) return `${Math.round(value * 1000)} ms`;
    if (value < 120) return `${value.toFixed(1)} s`;
    if (value < 7200) return `${Math.round(value / 60)} min`;
    return `${(value / 3600).toFixed(1)} h`;
  }

  const percent = (value) => (value === null || value === undefined ? "n/a" : `${Math.round(value * 100)}%`);
  const number = (value) =>
    value === null || value === undefined ? "n/a" : Number.isInteger(value) ? String(value) : value.toPrecision(4);
  const labelText = (labels, skip) =>
    Object.entries(labels || {})
      .filter(([k]) => !(skip || []).includes(k))
      .map(([k, v]) => `${k}="${v}"`)
      .join(", ");

  // A state or outcome as a badge whose colour class follows its meaning.
  const TONES = {
    healed: "good", HEALTHY: "good", resolved: "good", completed: "good", kept: "good", improving: "good",
    closed: "good", "circuit closed": "good", "circuit open": "bad", open: "info", running: "info", verifying: "info", pending: "info", in_progress: "info",
    measuring: "info", applying: "info", awaiting_approval: "warn", DEGRADED: "warn", paused: "warn",
    cooldown: "warn", unverified: "warn", dry_run: "warn", suspended: "warn", flapping: "warn",
    degrading: "warn", not_healed: "bad", failed: "bad", timeout: "bad", escalated: "bad", CRITICAL: "bad",
    FAILING: "bad", cancelled: "bad", rolled_back: "bad", rollback_failed: "bad", interrupted: "bad",
  };
  const badge = (text) => h("span", { class: `badge ${TONES[text] || "neutral"}` }, String(text).replace(/_/g, " "));

  function definitions(pairs) {
    return h(
      "dl",
      { class: "facts" },
      pairs.filter(Boolean).map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]),
    );
  }

  // Rebuild a list's items only when their data changed, so that focus and typed text survive a poll.
  function syncList(list, items, key, render, emptyId) {
    const existing = new Map([...list.children].map((el) => [el.dataset.key, el]));
    const wanted = [];
    for (const item of items) {
      const k = String(key(item));
      const signature = JSON.stringify(item);
      let el = existing.get(k);
      if (!el || (el.dataset.signature !== signature && !el.dataset.keep)) {
        const fresh = render(item);
        fresh.dataset.key = k;
        fresh.dataset.signature = signature;
        if (el && el.contains(document.activeElement)) {
          // Keep the focused control's place: replace everything else around it on the next change.
          el.dataset.signature = "";
        } else {
          if (el) el.replaceWith(fresh);
          el = fresh;
        }
      }
      wanted.push(el);
      existing.delete(k);
    }
    for (const el of existing.values()) el.remove();
    wanted.forEach((el, index) => {
      if (list.children[index] !== el) list.insertBefore(el, list.children[index] || null);
    });
    if (emptyId) byId(emptyId).hidden = items.length > 0;
  }

  // Replace a region's content only when its data changed.
  const lastRendered = new Map();
  function renderOnce(id, data, render) {
    const signature = JSON.stringify(data);
    if (lastRendered.get(id) === signature) return;
    lastRendered.set(id, signature);
    replace(byId(id), render(data));
  }

  // --- Links --------------------------------------------------------------------------------------
  function renderLinks() {
    const links = settings.links || {};
    const items = [];
    if (links.prometheus) items.push(["Prometheus alerts", `${links.prometheus}/alerts`]);
    if (links.alertmanager) items.push(["Alertmanager", `${links.alertmanager}/#/alerts`]);
    for (const d of links.dashboards || []) items.push([`Grafana: ${d.title}`, d.url]);
    replace(byId("links"), items.map(([text, href]) => h("a", { href, rel: "noreferrer" }, text)));
  }

  function alertmanagerLink(episode) {
    const base = (settings.links || {}).alertmanager;
    if (!base) return null;
    const filter = `{alertname="${episode.alertname}"}`;
    return h(
      "a",
      { href: `${base}/#/alerts?filter=${encodeURIComponent(filter)}`, rel: "noreferrer" },
      `${episode.alertname} in Alertmanager`,
    );
  }

  // --- Health and safety --------------------------------------------------------------------------
  function renderHealth(status) {
    const health = status.health;
    const healing = status.healing;
    const ttr = healing.time_to_heal_seconds || {};
    renderOnce("health-body", { health, healing }, () => [
      h(
        "p",
        { class: "headline" },
        badge(health.status),
        " trend ",
        badge(health.trend || "unknown"),
        healing.dry_run ? [" ", badge("dry_run")] : null,
      ),
      health.error ? h("p", { class: "warning" }, `Prometheus unavailable: ${health.error}`) : null,
      !health.error && health.status === "UNKNOWN"
        ? h("p", { class: "muted" }, "Prometheus has no health series yet: are healer's recording rules (rules/) loaded?")
        : null,
      definitions([
        ["CPU", percent(health.cpu_ratio)],
        ["Memory", percent(health.memory_ratio)],
        ["Errors", percent(health.error_ratio)],
        ["p99 latency", seconds(health.latency_p99_seconds)],
        ["Alerts firing", number(health.alerts_firing ?? 0)],
        ["Alerts received", number(healing.alerts_received)],
        ["Healed / escalated / open", `${healing.healed} / ${healing.escalated} / ${healing.in_progress}`],
        ["Resolution rate", percent(healing.resolution_rate)],
        ["Time to heal p50 / p95", `${seconds(ttr.p50)} / ${seconds(ttr.p95)}`],
        ["Replica", `${healing.replica}${healing.leader ? " (leader)" : ""}`],
      ]),
    ]);
  }

  function renderSummary(status) {
    const healing = status.healing;
    const paused = (healing.pauses || []).length;
    renderOnce("summary", { h: status.health.status, t: status.health.trend, c: healing.circuit_open, paused, o: healing.in_progress }, () => [
      badge(status.health.status),
      badge(status.health.trend || "unknown"),
      badge(healing.circuit_open ? "circuit open" : "circuit closed"),
      paused ? badge(`${paused} paused`) : null,
      `${healing.in_progress} open`,
    ]);
  }

  function renderCircuit(status) {
    const open = status.healing.circuit_open;
    renderOnce("circuit", { open }, () =>
      h(
        "div",
        { class: "circuit" },
        h("p", {}, "Circuit breaker: ", badge(open ? "open" : "closed")),
        open
          ? h("p", {}, "Healing is suspended: the action budget is spent.")
          : h("p", { class: "muted" }, "Healing may act within its budget."),
        open && canOperate
          ? actionButton("Close the circuit", "Close the circuit breaker and reset the action budget", () =>
              api("POST", "/api/v1/circuit/close"),
            )
          : null,
      ),
    );
  }

  function renderPauses(pauses, status) {
    const stored = (pauses ? pauses.pauses : []).filter((p) => p.active);
    const storedNames = new Set(stored.map((p) => `api:${p.id}`));
    const inForce = (status ? status.healing.pauses : []).filter(
      (p) => !(p.source === "api" && storedNames.has(`api:${p.name}`)),
    );
    const items = [
      ...stored.map((p) => ({ kind: "api", pause: p })),
      ...inForce.map((p) => ({ kind: "other", pause: p })),
    ];
    syncList(
      byId("pauses-list"),
      items,
      (item) => (item.kind === "api" ? `api-${item.pause.id}` : `${item.pause.source}-${item.pause.name}`),
      (item) => (item.kind === "api" ? storedPause(item.pause) : otherPause(item.pause)),
      "pauses-empty",
    );
  }

  function storedPause(p) {
    return h(
      "li",
      { class: "item" },
      h("p", {}, badge("paused"), " ", h("code", {}, p.matchers.join(", "))),
      h("p", {}, p.reason),
      h("p", { class: "muted" }, `by ${p.created_by} until ${clock(p.ends_at)}`),
      canOperate
        ? actionButton("End pause", `End pause ${p.id} (${p.matchers.join(", ")})`, () =>
            api("DELETE", `/api/v1/pauses/${p.id}`),
          )
        : null,
    );
  }

  function otherPause(p) {
    return h(
      "li",
      { class: "item" },
      h("p", {}, badge("paused"), ` ${p.source}: `, h("strong", {}, p.name)),
      h("p", {}, p.reason),
      p.until ? h("p", { class: "muted" }, `until ${clock(p.until)}`) : null,
    );
  }

  // A button that calls the API, disables itself meanwhile and reports a refusal beside itself.
  function actionButton(text, label, call) {
    const message = h("span", { class: "form-status", role: "status" });
    const button = h("button", { type: "button", "aria-label": label }, text);
    button.addEventListener("click", async () => {
      button.disabled = true;
      message.textContent = "";
      try {
        await call();
        message.textContent = "Done.";
        schedule(0);
      } catch (error) {
        message.textContent = error.message;
      } finally {
        button.disabled = false;
      }
    });
    return h("span", { class: "action" }, button, message);
  }

  // --- Episodes -----------------------------------------------------------------------------------
  // Each episode's newest step (the one it stands on), from the audit trail, newest first.
  function episodesOf(actions) {
    const episodes = new Map();
    for (const action of actions) {
      const current = episodes.get(action.episode.id);
      if (!current || action.id > current.id) episodes.set(action.episode.id, action);
    }
    return [...episodes.values()].sort((a, b) => b.episode.id - a.episode.id);
  }

  function episodeTitle(episode) {
    return `${episode.alertname} {${labelText(episode.labels, ["alertname"])}}`;
  }

  function stepState(action) {
    if (action.state === "done") return badge(action.outcome || "done");
    return badge(action.state);
  }

  function episodeItem(action) {
    const episode = action.episode;
    return h(
      "li",
      { class: "item" },
      h("p", {}, badge(episode.state), " ", h("strong", {}, episode.alertname), ` episode ${episode.id}`),
      h("p", { class: "labels" }, labelText(episode.labels, ["alertname"])),
      h(
        "p",
        {},
        `rule ${episode.rule || "none"} · step ${action.step + 1} attempt ${action.attempt}: ${action.strategy} `,
        stepState(action),
        action.skip_reason ? ` (${action.skip_reason.replace(/_/g, " ")})` : null,
      ),
      h(
        "p",
        { class: "row" },
        h(
          "button",
          {
            type: "button",
            "aria-label": `Show the timeline of episode ${episode.id} (${episode.alertname})`,
            onclick: () => selectEpisode(episode.id, action.id),
          },
          "Show timeline",
        ),
        alertmanagerLink(episode),
      ),
    );
  }

  function approvalItem(action) {
    const episode = action.episode;
    const reasonId = `reject-reason-${action.id}`;
    const status = h("p", { class: "form-status", role: "status", "aria-live": "polite" });
    const reason = h("input", { id: reasonId, type: "text", maxlength: 1000, autocomplete: "off", required: true });
    const approve = h(
      "button",
      { type: "button", class: "primary", "aria-label": `Approve step ${action.id}: ${action.strategy}` },
      "Approve",
    );
    const reject = h(
      "button",
      { type: "submit", class: "danger", "aria-label": `Reject step ${action.id}: ${action.strategy}` },
      "Reject",
    );
    const busy = async (work) => {
      approve.disabled = reject.disabled = true;
      status.textContent = "";
      try {
        await work();
        schedule(0);
      } catch (error) {
        status.textContent = error.message;
        approve.disabled = reject.disabled = false;
      }
    };
    approve.addEventListener("click", () =>
      busy(async () => {
        await api("POST", `/api/v1/actions/${action.id}/approve`);
        status.textContent = "Approved; the step runs now.";
        selectEpisode(episode.id, action.id);
      }),
    );
    const form = h(
      "form",
      {
        class: "reject",
        novalidate: true,
        onsubmit: (event) => {
          event.preventDefault();
          if (!reason.value.trim()) {
            status.textContent = "Say why the step is rejected.";
            reason.focus();
            return;
          }
          busy(async () => {
            await api("POST", `/api/v1/actions/${action.id}/reject`, { reason: reason.value });
            status.textContent = "Rejected; the episode escalates.";
            selectEpisode(episode.id, action.id);
          });
        },
      },
      h("label", { for: reasonId }, `Reason to reject step ${action.id}`),
      h("span", { class: "row" }, reason, reject),
    );
    const li = h(
      "li",
      { class: "item approval" },
      h("p", {}, badge("awaiting_approval"), " ", h("strong", {}, episodeTitle(episode))),
      definitions([
        ["Step", `${action.id} (step ${action.step + 1}, attempt ${action.attempt})`],
        ["Rule", action.rule],
        ["Strategy", action.strategy],
        ["Approve before", clock(action.approval_deadline)],
      ]),
      plan(action.plan, true),
      canOperate ? h("div", { class: "row" }, approve) : null,
      canOperate ? form : null,
      status,
    );
    // Rendered once: a poll must not wipe a reason being typed.
    li.dataset.keep = "1";
    return li;
  }

  function plan(value, open) {
    if (value === null || value === undefined) return h("p", { class: "muted" }, "No rendered plan yet.");
    return h(
      "details",
      { class: "plan", open },
      h("summary", {}, "Rendered plan"),
      h("pre", {}, JSON.stringify(value, null, 2)),
    );
  }

  // --- Timeline -----------------------------------------------------------------------------------
  let selected = null; // {episode, action}: the episode shown in the timeline, and one of its steps

  function selectEpisode(episodeId, actionId) {
    selected = { episode: episodeId, action: actionId, chosen: true };
    lastRendered.delete("timeline-body");
    schedule(0);
    // Keyboard users land on the timeline; the control they used may vanish with its list item.
    byId("timeline-heading").focus();
  }

  const TIME_FIELDS = /(^ts$|_at$|^deadline$|^not_before$|^until$|^ends$)/;

  function eventText(event) {
    const fields = Object.entries(event)
      .filter(([k, v]) => !["ts", "action_id", "kind"].includes(k) && v !== null && v !== undefined)
      .map(([k, v]) => {
        if (TIME_FIELDS.test(k) && typeof v === "number") return `${k} ${clock(v)}`;
        return `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`;
      });
    return fields.join(" · ");
  }

  function eventItem(event) {
    return h(
      "li",
      { class: `event event-${event.kind}` },
      h("time", {}, clock(event.ts)),
      " ",
      h("strong", {}, event.kind.replace(/_/g, " ")),
      " ",
      eventText(event),
    );
  }

  function output(text) {
    if (text === null || text === undefined || text === "") return null;
    const cut = text.length > OUTPUT_LIMIT;
    return h(
      "details",
      { class: "output" },
      h("summary", {}, cut ? `Output (first ${OUTPUT_LIMIT} of ${text.length} characters)` : "Output"),
      h("pre", {}, cut ? `${text.slice(0, OUTPUT_LIMIT)}\n…` : text),
    );
  }

  function stepItem(action, events) {
    const verification = events.find((e) => e.kind === "finished");
    const duration =
      action.started_at && action.finished_at ? ` (${seconds(action.finished_at - action.started_at)})` : "";
    return h(
      "li",
      { class: "step" },
      h(
        "h4",
        {},
        `Step ${action.step + 1}, attempt ${action.attempt}: ${action.strategy} `,
        stepState(action),
      ),
      definitions([
        ["Step id", String(action.id)],
        ["Scheduled", clock(action.created_at)],
        ["Started", clock(action.started_at)],
        ["Finished", `${clock(action.finished_at)}${duration}`],
        ["Outcome", action.outcome ? action.outcome.replace(/_/g, " ") : action.state.replace(/_/g, " ")],
        action.skip_reason ? ["Held or skipped", action.skip_reason.replace(/_/g, " ")] : null,
        action.exit_code !== null ? ["Exit code", String(action.exit_code)] : null,
        action.detail ? ["Detail", action.detail] : null,
        verification ? ["Verification", `${verification.outcome || "—"}: ${verification.detail || ""}`] : null,
        action.approved ? ["Approved", "yes"] : null,
      ]),
      plan(action.plan, false),
      output(action.output),
      events.length ? h("ol", { class: "events", "aria-label": `Events of step ${action.id}` }, events.map(eventItem)) : null,
    );
  }

  function renderTimeline(detail, steps) {
    renderOnce("timeline-body", { detail, steps }, () => {
      const episode = detail.episode;
      const events = detail.events || [];
      const episodeEvents = events.filter((e) => e.action_id === null || e.action_id === undefined);
      const escalation = events.filter((e) => e.kind.startsWith("escalat"));
      const silences = events.filter((e) => e.kind.includes("silence"));
      const ordered = [...steps].sort((a, b) => a.id - b.id);
      return [
        h(
          "p",
          { class: "headline" },
          badge(episode.state),
          " ",
          h("strong", {}, episodeTitle(episode)),
          ` episode ${episode.id}, rule ${episode.rule || "none"}, since ${episode.starts_at}`,
        ),
        escalation.length
          ? h("p", { class: "warning" }, "Escalated: ", escalation.map((e) => e.reason || e.kind).join("; "))
          : null,
        silences.length ? h("p", {}, "Silence: ", silences.map(eventText).join("; ")) : null,
        h("ol", { class: "steps", "aria-label": `Steps of episode ${episode.id}` },
          ordered.map((a) => stepItem(a, events.filter((e) => e.action_id === a.id)))),
        h("h3", {}, "Episode events"),
        h("ol", { class: "events" }, episodeEvents.map(eventItem)),
      ];
    });
  }

  // --- Goals and optimisation ----------------------------------------------------------------------
  function goalItem(goal) {
    const progress = goal.progress === null || goal.progress === undefined ? null : Math.max(0, Math.min(1, goal.progress));
    const target = goal.target || {};
    const bound = target.below !== null && target.below !== undefined ? `below ${target.below}` : `above ${target.above}`;
    const open = goal.state === "pending" || goal.state === "in_progress";
    return h(
      "li",
      { class: "item" },
      h("p", {}, badge(goal.state), " ", h("strong", {}, goal.name), ` ${labelText(goal.labels)}`),
      goal.description ? h("p", {}, goal.description) : null,
      h(
        "p",
        { class: "row" },
        h("progress", { max: 1, value: progress ?? 0, "aria-label": `Progress of goal ${goal.name}` }),
        progress === null ? "unmeasured" : percent(progress),
      ),
      definitions([
        ["Priority", goal.priority],
        ["Value", `${number(goal.value)} (target ${bound})`],
        ["Deadline", clock(goal.deadline)],
        goal.detail ? ["Detail", goal.detail] : null,
      ]),
      open && canOperate
        ? actionButton("Cancel goal", `Cancel goal ${goal.id} (${goal.name})`, () =>
            api("POST", `/api/v1/goals/${goal.id}/cancel`),
          )
        : null,
    );
  }

  function table(caption, columns, rows) {
    if (!rows.length) return h("p", { class: "muted" }, `No ${caption.toLowerCase()}.`);
    return h(
      "table",
      {},
      h("caption", { class: "visually-hidden" }, caption),
      h("thead", {}, h("tr", {}, columns.map(([title]) => h("th", { scope: "col" }, title)))),
      h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([, cell]) => h("td", {}, cell(row)))))),
    );
  }

  function renderOptimization(data) {
    const trials = data.trials || [];
    const inFlight = data.in_flight;
    byId("optimization-summary").textContent =
      `${(data.candidates || []).length} candidates, minimum confidence ${percent(data.min_confidence)}` +
      (inFlight ? `; trying ${inFlight.candidate} on ${inFlight.component} (${inFlight.outcome})` : "; no trial in flight");
    renderOnce("candidates", data.candidates, (candidates) =>
      table("Candidates", [
        ["Candidate", (c) => c.name],
        ["Component", (c) => c.component],
        ["State", (c) => badge(c.state)],
        ["Confidence", (c) => percent(c.confidence)],
        ["Score", (c) => number(c.score)],
        ["Helped / trials", (c) => `${c.helped} / ${c.trials}`],
      ], candidates || []),
    );
    renderOnce("trials", trials, () =>
      table("Trials", [
        ["Candidate", (t) => t.candidate],
        ["Component", (t) => t.component],
        ["Outcome", (t) => badge(t.outcome)],
        ["Before", (t) => number(t.before)],
        ["After", (t) => number(t.after)],
        ["Improvement", (t) => percent(t.improvement)],
        ["Confidence", (t) => percent(t.confidence)],
        ["Applied", (t) => clock(t.applied_at)],
        ["Detail", (t) => t.detail || ""],
      ], trials),
    );
    renderOnce("ladders", data.ladders, (ladders) => {
      const rules = Object.entries(ladders || {});
      if (!rules.length) return h("p", { class: "muted" }, "No rule learns its ladder's order.");
      return rules.map(([rule, rungs]) => [
        h("h4", {}, `Rule ${rule}`),
        h("ol", { class: "ladder" }, rungs.map((r) =>
          h("li", {}, h("strong", {}, r.strategy), ` confidence ${percent(r.confidence)}, healed ${r.healed} of ${r.trials}`))),
      ]);
    });
  }

  // --- Audit -------------------------------------------------------------------------------------
  // How each operator's act reads on the page.
  const ACTS = {
    approved: "Approved a step",
    rejected: "Rejected a step",
    paused: "Paused healing",
    pause_ended: "Ended a pause",
    circuit_closed: "Closed the circuit",
    goal_opened: "Opened a goal",
    goal_cancelled: "Cancelled a goal",
    optimization_acknowledged: "Acknowledged an optimisation",
  };

  // Approvals and rejections are events of their step, not rows of /api/v1/audit: each decided step's events
  // are read once and kept here (a decision never changes), for the steps that the actions list still holds.
  const decisions = new Map();

  function actSubject(subject) {
    if (subject.goal !== undefined) {
      const labels = labelText(subject.labels);
      return `goal ${subject.goal} ${subject.name}${labels ? ` {${labels}}` : ""}`;
    }
    if (subject.candidate !== undefined) return `candidate ${subject.candidate}`;
    return Object.entries(subject)
      .map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`)
      .join(", ");
  }

  function pauseActs(pauses) {
    return pauses.flatMap((p) => {
      const subject = `pause ${p.id}: ${p.matchers.join(", ")}`;
      const created = { key: `pause-${p.id}`, at: p.created_at, act: "paused", by: p.created_by, subject: `${subject} (${p.reason})` };
      if (p.ended_at === null || p.ended_at === undefined) return [created];
      return [created, { key: `unpause-${p.id}`, at: p.ended_at, act: "pause_ended", by: p.ended_by, subject }];
    });
  }

  async function decisionActs(actions) {
    const decided = actions.filter((a) => a.approved || a.skip_reason === "rejected");
    const wanted = new Set(decided.map((a) => a.id));
    for (const id of decisions.keys()) if (!wanted.has(id)) decisions.delete(id);
    const unread = decided.filter((a) => !decisions.has(a.id)).slice(0, DECISIONS_PER_POLL);
    await Promise.all(
      unread.map(async (action) => {
        try {
          const detail = await api("GET", `/api/v1/actions/${action.id}`);
          const steps = `step ${action.id} (${action.strategy}) of ${action.episode.alertname} episode ${action.episode.id}`;
          decisions.set(
            action.id,
            (detail.events || [])
              .filter((e) => e.action_id === action.id && (e.kind === "approved" || e.kind === "rejected"))
              .map((e) => ({
                key: `${e.kind}-${action.id}`,
                at: e.ts,
                act: e.kind,
                by: e.by,
                subject: e.reason ? `${steps}: ${e.reason}` : steps,
              })),
          );
        } catch (error) {
          // A step purged meanwhile has nothing to show; any other failure is tried again next poll.
          if (error.status === 404) decisions.set(action.id, []);
        }
      }),
    );
    return [...decisions.values()].flat();
  }

  async function renderAudit(audit, pauses, actions) {
    const acts = [
      ...(audit ? audit.acts : []).map((a) => ({ key: `act-${a.id}`, at: a.at, act: a.act, by: a.by, subject: actSubject(a.subject || {}) })),
      ...pauseActs(pauses ? pauses.recent || [] : []),
      ...(actions ? await decisionActs(actions) : []),
    ]
      .sort((a, b) => b.at - a.at || (a.key < b.key ? -1 : 1))
      .slice(0, AUDIT_LIMIT);
    renderOnce("audit-body", acts, () =>
      table("Operators' acts", [
        ["Time", (a) => h("time", { datetime: new Date(a.at * 1000).toISOString() }, clock(a.at))],
        ["Act", (a) => ACTS[a.act] || a.act.replace(/_/g, " ")],
        ["By", (a) => h("strong", {}, a.by || "—")],
        ["Subject", (a) => a.subject || "—"],
      ], acts),
    );
  }

  // --- Polling ------------------------------------------------------------------------------------
  let timer = null;
  let running = false;

  function schedule(delay) {
    clearTimeout(timer);
    timer = setTimeout(poll, delay);
  }

  async function poll() {
    if (running) return schedule(POLL_MS);
    running = true;
    try {
      await refresh();
    } catch (error) {
      byId("connection").textContent = `Could not refresh: ${error.message}`;
    } finally {
      running = false;
      schedule(document.hidden ? POLL_MS * 5 : POLL_MS);
    }
  }

  async function refresh() {
    const [status, actions, pauses, goals, optimization, audit] = await Promise.allSettled([
      api("GET", "/api/v1/status"),
      api("GET", `/api/v1/actions?limit=${STEPS_LIMIT}`),
      api("GET", `/api/v1/pauses?limit=${AUDIT_LIMIT}`),
      api("GET", "/api/v1/goals?limit=20"),
      api("GET", "/api/v1/optimizations?limit=20"),
      api("GET", `/api/v1/audit?limit=${AUDIT_LIMIT}`),
    ]);
    const failures = [status, actions, pauses, goals, optimization, audit].filter((r) => r.status === "rejected");
    const connection = byId("connection");
    const text = failures.length ? `Some data could not be read: ${failures[0].reason.message}` : "Up to date";
    // A live region: changed only when the state changes, so a screen reader is not told every poll.
    if (connection.textContent !== text) connection.textContent = text;
    connection.classList.toggle("warning", failures.length > 0);
    byId("updated").textContent = `at ${clock(Date.now() / 1000)}`;

    if (status.status === "fulfilled") {
      renderHealth(status.value);
      renderSummary(status.value);
      renderCircuit(status.value);
      const goalsReport = status.value.goals || {};
      byId("goals-summary").textContent =
        `${goalsReport.enabled === false ? "Planner disabled. " : ""}` +
        `${goalsReport.pending || 0} pending, ${goalsReport.in_progress || 0} in progress, ` +
        `${goalsReport.completed || 0} completed, ${goalsReport.failed || 0} failed, ${goalsReport.cancelled || 0} cancelled`;
    }
    if (pauses.status === "fulfilled" || status.status === "fulfilled") {
      renderPauses(pauses.value, status.value);
    }
    if (goals.status === "fulfilled") {
      syncList(byId("goals-list"), goals.value.goals, (g) => g.id, goalItem);
    }
    if (optimization.status === "fulfilled") renderOptimization(optimization.value);
    if (audit.status === "fulfilled" || pauses.status === "fulfilled" || actions.status === "fulfilled") {
      await renderAudit(audit.value, pauses.value, actions.value ? actions.value.actions : null);
    }
    if (actions.status === "fulfilled") await renderEpisodes(actions.value.actions);
  }

  async function renderEpisodes(actions) {
    const approvals = actions.filter((a) => a.state === "awaiting_approval").sort((a, b) => a.id - b.id);
    syncList(byId("approvals-list"), approvals, (a) => a.id, approvalItem, "approvals-empty");
    const episodes = episodesOf(actions);
    const firing = episodes.filter((a) => a.episode.state === "open");
    const ended = episodes.filter((a) => a.episode.state !== "open").slice(0, 15);
    syncList(byId("firing-list"), firing, (a) => a.episode.id, episodeItem, "firing-empty");
    syncList(byId("recent-list"), ended, (a) => a.episode.id, episodeItem, "recent-empty");

    // Unless someone chose one, the timeline follows the newest firing episode, else the newest one.
    if (!selected || !selected.chosen) {
      const follow = firing[0] || episodes[0];
      if (follow) selected = { episode: follow.episode.id, action: follow.id, chosen: false };
    }
    if (!selected) return;
    const newest = episodes.find((a) => a.episode.id === selected.episode);
    const actionId = newest ? newest.id : selected.action;
    const [detail, steps] = await Promise.all([
      api("GET", `/api/v1/actions/${actionId}`),
      api("GET", `/api/v1/actions?episode=${selected.episode}&limit=100`),
    ]);
    renderTimeline(detail, steps.actions);
  }

  // --- Forms --------------------------------------------------------------------------------------
  function setUpPauseForm() {
    const form = byId("pause-form");
    if (!canOperate) {
      form.hidden = true;
      return;
    }
    const status = byId("pause-status");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const matchers = byId("pause-matchers")
        .value.split("\n")
        .map((m) => m.trim())
        .filter(Boolean);
      const reason = byId("pause-reason").value.trim();
      const duration = byId("pause-duration").value.trim();
      if (!matchers.length || !reason || !duration) {
        status.textContent = "Give at least one matcher, a reason and a duration.";
        return;
      }
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      status.textContent = "";
      try {
        const answer = await api("POST", "/api/v1/pauses", { matchers, reason, duration });
        status.textContent = `Paused (pause ${answer.id}).`;
        byId("pause-reason").value = "";
        schedule(0);
      } catch (error) {
        status.textContent = error.message;
      } finally {
        button.disabled = false;
      }
    });
  }

  renderLinks();
  setUpPauseForm();
  poll();
})();
