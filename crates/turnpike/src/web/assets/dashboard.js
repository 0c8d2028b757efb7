// The live dashboard: reads /api/stats/stream (server-sent events, read
// with fetch so the admin token goes in a header, never in a URL) and
// drives drain and session deletion through the admin API. In a fleet
// (--redis-url) it also polls /api/fleet every 2 s for every node's
// version, health, load and drain state, drains or undrains any of them,
// and searches a user's sessions on every node.
'use strict';

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem('turnpike-token') || '';
let last = null;
let abort = null;
const history = [];

function api(method, path) {
  return fetch(path, { method, headers: { Authorization: 'Bearer ' + token } });
}

function bytes(n) {
  const u = ['B', 'kB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
}

function bits(n) {
  const u = ['bit/s', 'kbit/s', 'Mbit/s', 'Gbit/s'];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fill(id, rows) {
  const tbody = $(id).querySelector('tbody');
  tbody.replaceChildren(...rows);
}

function keyRows(obj, empty) {
  const entries = Object.entries(obj || {}).filter(([, v]) => v > 0);
  if (!entries.length) {
    const tr = document.createElement('tr');
    tr.appendChild(cell(empty, 'muted'));
    tr.appendChild(cell(''));
    return [tr];
  }
  return entries.map(([k, v]) => {
    const tr = document.createElement('tr');
    tr.appendChild(cell(k.replaceAll('_', ' ')));
    tr.appendChild(cell(String(v), 'num'));
    return tr;
  });
}

function render(s) {
  last = s;
  const n = s.node;
  // The start-up line's fast-path text, shortened: the whole of it is
  // the tooltip.
  const fast = (n.fast_path || 'off').split(' (')[0].split(';')[0];
  $('node-state').title = 'fast path: ' + (n.fast_path || 'off');
  const state = [n.draining ? 'draining' : 'serving', 'fast path: ' + fast,
    'redis: ' + n.redis + (n.fleet_nodes !== null ? ' (' + n.fleet_nodes + ' nodes)' : ''), 'up ' + Math.round(n.uptime_s / 60) + ' min'];
  $('node-state').textContent = state.join(' · ');
  $('node-state').className = n.draining ? 'warn' : 'ok';
  $('drain').textContent = n.draining ? 'Stop draining' : 'Drain';
  $('drain').dataset.draining = String(n.draining);
  const r = s.rates || { to_peer_pps: 0, from_peer_pps: 0, to_peer_bps: 0, from_peer_bps: 0 };
  const tiles = [
    ['allocations', s.allocations.total], ['UDP', s.allocations.udp], ['TCP', s.allocations.tcp], ['TLS', s.allocations.tls], ['DTLS', s.allocations.dtls],
    ['to peers, packets/s', r.to_peer_pps], ['from peers, packets/s', r.from_peer_pps],
    ['to peers', bits(r.to_peer_bps)], ['from peers', bits(r.from_peer_bps)],
    ['channels', s.channels], ['permissions', s.permissions], ['TCP/TLS connections', s.connections],
  ];
  $('tiles').replaceChildren(...tiles.map(([k, v]) => {
    const d = document.createElement('div');
    d.className = 'tile';
    d.dataset.key = k;
    const vv = document.createElement('div'); vv.className = 'v'; vv.textContent = String(v);
    const kk = document.createElement('div'); kk.className = 'k'; kk.textContent = k;
    d.append(vv, kk);
    return d;
  }));
  if (s.rates) {
    history.push(r.to_peer_pps + r.from_peer_pps);
    if (history.length > 120) history.shift();
    const max = Math.max(1, ...history);
    const pts = history.map((v, i) => (i * 120 / 119).toFixed(1) + ',' + (58 - v / max * 56).toFixed(1));
    $('spark').querySelector('polyline').setAttribute('points', pts.join(' '));
  }
  fill('errors', keyRows(s.errors, 'none sent'));
  fill('refusals', keyRows(s.refusals, 'none'));
  fill('users', s.top_users.length ? s.top_users.map((u) => {
    const tr = document.createElement('tr');
    tr.append(cell(u.user), cell(String(u.allocations), 'num'), cell(bytes(u.to_peer_bytes), 'num'), cell(bytes(u.from_peer_bytes), 'num'));
    return tr;
  }) : [Object.assign(document.createElement('tr'), { innerHTML: '<td class="muted">no allocations</td>' })]);
  $('sessions-count').textContent = s.sessions_total > s.sessions.length
    ? '(' + s.sessions.length + ' busiest of ' + s.sessions_total + ')' : '(' + s.sessions_total + ')';
  fill('sessions', s.sessions.map((x) => {
    const tr = document.createElement('tr');
    tr.dataset.relayed = x.relayed;
    tr.dataset.user = x.user;
    const del = document.createElement('button');
    del.className = 'danger';
    del.textContent = 'Delete';
    del.addEventListener('click', () => deleteSession(x.relayed, del));
    const td = document.createElement('td');
    td.appendChild(del);
    tr.append(cell(x.user), cell(x.client), cell(x.transport), cell(x.relayed), cell(x.age_s + ' s', 'num'),
      cell(bytes(x.to_peer.bytes), 'num'), cell(bytes(x.from_peer.bytes), 'num'), td);
    return tr;
  }));
  document.body.dataset.state = 'live';
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  $('live').textContent = 'updated ' + new Date().toLocaleTimeString();
}

function duration(s) {
  if (s < 120) return Math.round(s) + ' s';
  if (s < 7200) return Math.round(s / 60) + ' min';
  if (s < 172800) return Math.round(s / 3600) + ' h';
  return Math.round(s / 86400) + ' d';
}

let fleetTimer = null;

function renderFleet(f) {
  const now = Date.now();
  $('fleet-count').textContent = '(' + f.nodes.length + (f.nodes.length === 1 ? ' node)' : ' nodes)');
  fill('fleet-nodes', f.nodes.map((n) => {
    const tr = document.createElement('tr');
    tr.dataset.node = n.name;
    tr.dataset.draining = String(n.draining);
    const health = (n.problems || []).length ? n.problems.join('; ') : 'ok';
    tr.dataset.health = health;
    const name = cell(n.name + (n.name === f.this_node ? ' (this node)' : ''));
    name.title = [n.ipv4, n.ipv6].filter(Boolean).join(', ');
    const button = document.createElement('button');
    button.textContent = n.draining ? 'Undrain' : 'Drain';
    button.className = n.draining ? '' : 'danger';
    button.addEventListener('click', () => drainNode(n.name, !n.draining, button));
    const td = document.createElement('td');
    td.appendChild(button);
    const l = n.load || { packets_per_s: 0, bits_per_s: 0, cpu_percent: 0 };
    tr.append(name, cell(n.version || 'unknown'), cell(health, health === 'ok' ? 'ok' : 'bad'),
      cell(n.draining ? 'draining' : 'serving', n.draining ? 'warn' : 'ok'), cell(String(n.allocations), 'num'),
      cell(String(l.packets_per_s), 'num'), cell(bits(l.bits_per_s), 'num'), cell(l.cpu_percent.toFixed(1) + ' %', 'num'),
      cell(n.started_ms ? duration((now - n.started_ms) / 1000) : '', 'num'), td);
    return tr;
  }));
  document.body.dataset.fleetUpdates = String(Number(document.body.dataset.fleetUpdates || 0) + 1);
}

async function pollFleet() {
  try {
    const r = await api('GET', 'api/fleet');
    if (r.status === 404) { $('fleet').hidden = true; return; }
    if (r.ok) {
      $('fleet').hidden = false;
      renderFleet(await r.json());
    } else {
      $('fleet-count').textContent = '(redis: HTTP ' + r.status + ')';
    }
  } catch (e) {
    $('fleet-count').textContent = '(' + e.message + ')';
  }
}

async function drainNode(name, on, button) {
  if (on && !confirm('Drain ' + name + '? New allocations go elsewhere (300) or are refused; calls in progress go on.')) return;
  button.disabled = true;
  const r = await api(on ? 'POST' : 'DELETE', 'api/fleet/nodes/' + encodeURIComponent(name) + '/drain');
  if (!r.ok) alert((on ? 'drain' : 'undrain') + ' of ' + name + ' failed: HTTP ' + r.status);
  await pollFleet();
}

async function searchFleet(e) {
  if (e) e.preventDefault();
  const user = $('fleet-user').value.trim();
  if (!user) return;
  $('fleet-search-state').textContent = 'asking every node…';
  const r = await api('GET', 'api/fleet/users/' + encodeURIComponent(user) + '/sessions');
  if (!r.ok) { $('fleet-search-state').textContent = 'search failed: HTTP ' + r.status; return; }
  const v = await r.json();
  const rows = [];
  for (const n of v.nodes) {
    for (const x of n.sessions) {
      const tr = document.createElement('tr');
      tr.dataset.node = n.name;
      tr.dataset.relayed = x.relayed;
      tr.append(cell(n.name), cell(x.client), cell(x.transport), cell(x.relayed), cell(x.age_s + ' s', 'num'),
        cell(bytes(x.to_peer.bytes), 'num'), cell(bytes(x.from_peer.bytes), 'num'));
      rows.push(tr);
    }
  }
  fill('fleet-sessions', rows);
  $('fleet-sessions').hidden = false;
  $('fleet-delete').hidden = rows.length === 0;
  $('fleet-delete').dataset.user = user;
  const silent = v.not_answering.length ? '; not answering: ' + v.not_answering.join(', ') : '';
  $('fleet-search-state').textContent = rows.length + ' session' + (rows.length === 1 ? '' : 's') + ' of ' + user +
    ' on ' + v.nodes.filter((n) => n.sessions.length).length + ' node(s)' + silent;
  $('fleet-search-state').dataset.searched = user;
}

async function deleteEverywhere() {
  const user = $('fleet-delete').dataset.user;
  if (!confirm('Delete every session of ' + user + ' on every node? Their calls lose the relay.')) return;
  const r = await api('DELETE', 'api/fleet/users/' + encodeURIComponent(user) + '/sessions');
  if (!r.ok) { alert('delete failed: HTTP ' + r.status); return; }
  // The nodes delete as they hear it: look again once they have.
  await new Promise((res) => setTimeout(res, 500));
  await searchFleet();
}

async function deleteSession(relayed, button) {
  if (!confirm('Delete the allocation relayed at ' + relayed + '? Its call loses the relay.')) return;
  button.disabled = true;
  const r = await api('DELETE', 'api/sessions/' + encodeURIComponent(relayed));
  if (!r.ok && r.status !== 404) { button.disabled = false; alert('delete failed: HTTP ' + r.status); }
}

async function toggleDrain() {
  const draining = $('drain').dataset.draining === 'true';
  if (!draining && !confirm('Drain this node? New allocations go elsewhere (300) or are refused; calls in progress go on.')) return;
  const r = await api(draining ? 'DELETE' : 'POST', 'api/drain');
  if (!r.ok) alert('drain failed: HTTP ' + r.status);
}

// One SSE frame is "data: JSON" and a blank line.
async function stream() {
  abort = new AbortController();
  const r = await fetch('api/stats/stream', { headers: { Authorization: 'Bearer ' + token }, signal: abort.signal });
  if (r.status === 401) throw new Error('the admin token was refused');
  if (!r.ok) throw new Error('HTTP ' + r.status + (r.status === 404 ? ': start the server with --web-ui' : ''));
  $('signin').hidden = true;
  $('board').hidden = false;
  if (!fleetTimer) { pollFleet(); fleetTimer = setInterval(pollFleet, 2000); }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error('the server closed the stream');
    buf += value;
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const frame = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = frame.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n');
      if (data) render(JSON.parse(data));
    }
  }
}

async function connect() {
  for (;;) {
    try {
      await stream();
    } catch (e) {
      if (e.message.includes('token')) {
        $('signin').hidden = false;
        $('signin-error').textContent = e.message;
        document.body.dataset.state = 'signed-out';
        return;
      }
      $('live').textContent = 'disconnected (' + e.message + '); retrying';
      await new Promise((res) => setTimeout(res, 2000));
    }
  }
}

$('signin').addEventListener('submit', (e) => {
  e.preventDefault();
  token = $('token').value.trim();
  sessionStorage.setItem('turnpike-token', token);
  $('signin-error').textContent = '';
  connect();
});
$('drain').addEventListener('click', toggleDrain);
$('fleet-search').addEventListener('submit', searchFleet);
$('fleet-delete').addEventListener('click', deleteEverywhere);
if (token) { $('token').value = token; connect(); }
