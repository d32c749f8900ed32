// The playground: generates through /v1/completions with seriatim's `trace` extension (server/trace.py) and
// shows every token as a chip shaded by its probability; a selected token shows the distribution it was
// drawn from, raw and processed, and which cut removed each alternative; an alternative starts a branch.

const $ = (id) => document.getElementById(id);
const TOP = 10;  // alternatives per token
const branches = [];
let running = null;  // the AbortController of the generation in flight

function headers() {
  const h = { "content-type": "application/json" };
  if ($("api_key").value) h.authorization = `Bearer ${$("api_key").value}`;
  return h;
}

async function post(path, body, signal) {
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!r.ok) throw new Error((await r.json()).error?.message || `HTTP ${r.status}`);
  return r;
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function settings() {
  const body = { temperature: number("temperature"), top_p: number("top_p"), top_k: number("top_k"),
                 min_p: number("min_p"), repetition_penalty: number("repetition_penalty"),
                 max_tokens: number("max_tokens"), logprobs: TOP, trace: true, stream: true };
  if (number("seed") !== null) body.seed = number("seed");
  const kind = $("constraint").value, text = $("constraint_text").value.trim();
  if (kind === "guided_json") body.guided_json = text ? JSON.parse(text) : { type: "object" };
  if (kind === "guided_regex") body.guided_regex = text;
  return body;
}

async function promptIds() {
  const chat = document.querySelector("input[name=mode]:checked").value === "chat";
  const text = $("prompt").value;
  const body = chat ? { messages: [{ role: "user", content: text }] } : { prompt: text };
  return (await (await post("/tokenize", body)).json()).tokens;
}

// One column: the prompt, tokens inherited from the branch it came from, then its own, and its passes.
function newBranch(promptIds, inherited, origin) {
  const b = { id: branches.length + 1, promptIds, tokens: [...inherited], passes: [], origin };
  const el = document.createElement("article");
  el.className = "branch";
  el.innerHTML = `<h2></h2><div class="tokens" role="list"></div><div class="timeline" role="img"></div>
                  <p class="stats"></p>`;
  el.querySelector("h2").textContent = origin ? `Branch ${b.id}: from token ${origin.index + 1} of branch ` +
    `${origin.branch}, taking ${JSON.stringify(origin.text)}` : `Branch ${b.id}`;
  b.el = el;
  $("branches").append(el);
  branches.push(b);
  inherited.forEach((t, i) => addChip(b, t, i, i < inherited.length - 1 || !origin));
  return b;
}

function addChip(b, token, index, inheritedChip) {
  const chip = document.createElement("button");
  chip.type = "button";
  chip.className = "chip" + (inheritedChip ? " inherited" : "");
  chip.setAttribute("role", "listitem");
  chip.textContent = token.text;
  const p = Math.exp(token.logprob ?? -Infinity);
  chip.style.setProperty("--p", (0.08 + 0.6 * p).toFixed(3));
  chip.setAttribute("aria-label", `${JSON.stringify(token.text)}, probability ${(100 * p).toFixed(1)}%`);
  chip.addEventListener("click", () => select(b, index, chip));
  b.el.querySelector(".tokens").append(chip);
}

function addPass(b, pass) {
  b.passes.push(pass);
  const bar = document.createElement("div");
  bar.className = "bar" + (pass.tokens > 1 ? " prefill" : "");
  const top = Math.max(...b.passes.map((x) => x.ms));
  b.el.querySelectorAll(".bar").forEach((el, i) => { el.style.height = `${(100 * b.passes[i].ms) / top}%`; });
  bar.style.height = `${(100 * pass.ms) / top}%`;
  bar.title = `pass ${pass.index}: ${pass.tokens} token${pass.tokens > 1 ? "s" : ""} in ${pass.ms.toFixed(1)} ms`;
  b.el.querySelector(".timeline").append(bar);
  b.el.querySelector(".timeline").setAttribute("aria-label", `${b.passes.length} forward passes`);
  const [first, ...rest] = b.passes;
  const decodeMs = rest.reduce((s, x) => s + x.ms, 0);
  b.el.querySelector(".stats").textContent = `first pass: ${first.tokens} tokens in ${first.ms.toFixed(1)} ms ` +
    `(${Math.round((1000 * first.tokens) / first.ms)} tok/s)` + (rest.length ? `; then ${rest.length} passes of one ` +
    `token: ${(rest.length / (decodeMs / 1000)).toFixed(1)} tok/s` : "");
}

function pct(logprob) {
  return logprob === null || logprob === undefined ? "—" : `${(100 * Math.exp(logprob)).toFixed(2)}%`;
}

function select(b, index, chip) {
  document.querySelectorAll(".chip.selected").forEach((el) => el.classList.remove("selected"));
  chip.classList.add("selected");
  const t = b.tokens[index];
  const d = $("detail");
  d.innerHTML = `<h2>Token ${index + 1} of branch ${b.id}</h2>
    <p>Drawn: <code></code> · raw ${pct(t.logprob)} · after processing ${pct(t.processed_logprob)}</p>
    <p>Entropy: model ${t.entropy.toFixed(3)} nats · processed ${t.processed_entropy.toFixed(3)} nats</p>
    <table><caption>Top ${t.alternatives.length} alternatives by the model's probability</caption>
    <thead><tr><th scope="col">token</th><th scope="col">model</th><th scope="col">processed</th>
    <th scope="col">removed by</th><th scope="col"></th></tr></thead><tbody></tbody></table>`;
  d.querySelector("code").textContent = JSON.stringify(t.text);
  for (const alt of t.alternatives) {
    const row = document.createElement("tr");
    row.innerHTML = `<td><code></code></td><td class="num">${pct(alt.logprob)}</td>
      <td class="num">${pct(alt.processed_logprob)}</td><td class="${alt.removed_by ? "removed" : ""}">
      ${alt.removed_by ?? ""}</td><td><button type="button">branch</button></td>`;
    row.querySelector("code").textContent = JSON.stringify(alt.text);
    const button = row.querySelector("button");
    button.setAttribute("aria-label", `continue from ${JSON.stringify(alt.text)} in a new branch`);
    button.addEventListener("click", () => branchFrom(b, index, alt));
    d.querySelector("tbody").append(row);
  }
}

async function branchFrom(b, index, alt) {
  const chosen = { ...alt, entropy: 0, processed_entropy: 0, alternatives: [] };
  const inherited = [...b.tokens.slice(0, index), chosen];
  const child = newBranch(b.promptIds, inherited, { branch: b.id, index, text: alt.text });
  await run(child);
}

async function run(b) {
  running?.abort();
  running = new AbortController();
  $("stop").disabled = false;
  $("status").textContent = `generating branch ${b.id}…`;
  try {
    const body = { ...settings(), prompt: [...b.promptIds, ...b.tokens.map((t) => t.id)] };
    const r = await post("/v1/completions", body, running.signal);
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) receive(b, event);
    }
    $("status").textContent = `branch ${b.id}: done`;
  } catch (e) {
    $("status").textContent = e.name === "AbortError" ? `branch ${b.id}: stopped` : `error: ${e.message}`;
  } finally {
    $("stop").disabled = true;
    running = null;
  }
}

function receive(b, event) {
  if (!event.startsWith("data: {")) return;
  const choice = JSON.parse(event.slice(6)).choices[0];
  const trace = choice?.trace;
  if (!trace || !trace.tokens.length) return;
  if (trace.pass) addPass(b, trace.pass);
  for (const token of trace.tokens) {
    b.tokens.push(token);
    addChip(b, token, b.tokens.length - 1, false);
  }
}

$("controls").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const ids = await promptIds();
    const b = newBranch(ids, [], null);
    const promptChip = document.createElement("span");
    promptChip.className = "chip prompt";
    promptChip.textContent = $("prompt").value;
    b.el.querySelector(".tokens").append(promptChip);
    await run(b);
  } catch (err) {
    $("status").textContent = `error: ${err.message}`;
  }
});
$("stop").addEventListener("click", () => running?.abort());

fetch("/v1/models", { headers: headers() }).then((r) => r.json())
  .then((m) => { $("model").textContent = `model: ${m.data[0].id}`; })
  .catch(() => { $("model").textContent = "model: (enter the API key)"; });
