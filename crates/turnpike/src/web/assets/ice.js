// The ICE test page: gathers candidates per transport in this browser
// against this server, then relays a data channel through it. Results are
// shown in plain words, and left in window.iceResult for scripts.
'use strict';

const $ = (id) => document.getElementById(id);
const mode = document.body.dataset.mode;
const GATHER_MS = 10000;
const RELAY_MS = 12000;

if (mode === 'operator') {
  $('token-row').hidden = false;
  $('token').value = sessionStorage.getItem('turnpike-token') || '';
}

async function getCredential() {
  const headers = {};
  if (mode === 'operator') {
    const t = $('token').value.trim();
    sessionStorage.setItem('turnpike-token', t);
    headers.Authorization = 'Bearer ' + t;
  }
  const r = await fetch(mode === 'operator' ? 'api/ice/credentials' : 'ice/credentials', { method: 'POST', headers });
  if (r.status === 401) throw new Error('the admin token was refused: paste the token the server was started with');
  if (r.status === 429) throw new Error('too many tests from this address: try again in ' + (r.headers.get('retry-after') || '60') + ' s');
  if (!r.ok) throw new Error('the server gave no credential (HTTP ' + r.status + ')');
  return r.json();
}

// "candidate:F C proto prio addr port typ TYPE [raddr A rport P] ..."
function parseCandidate(line) {
  const f = line.replace(/^a=/, '').split(' ');
  const c = { protocol: (f[2] || '').toLowerCase(), address: f[4], port: Number(f[5]), type: f[7] };
  for (let i = 8; i + 1 < f.length; i += 2) {
    if (f[i] === 'raddr') c.raddr = f[i + 1];
    if (f[i] === 'rport') c.rport = Number(f[i + 1]);
  }
  return c;
}

function iceServer(server, cred) {
  if (server.transport === 'stun') return { urls: server.urls };
  return { urls: server.urls, username: cred.username, credential: cred.credential };
}

// Gathers against one server; the time to the first relay (or reflexive)
// candidate is what the allocation (or binding) took.
async function gather(server, cred) {
  const out = { candidates: [], errors: [], firstMs: null };
  const pc = new RTCPeerConnection({ iceServers: [iceServer(server, cred)] });
  const want = server.transport === 'stun' ? 'srflx' : 'relay';
  const t0 = performance.now();
  const done = new Promise((resolve) => {
    const timer = setTimeout(resolve, GATHER_MS);
    pc.onicecandidate = (e) => {
      if (!e.candidate) { clearTimeout(timer); resolve(); return; }
      if (!e.candidate.candidate) return;
      const c = parseCandidate(e.candidate.candidate);
      out.candidates.push(c);
      if (c.type === want && out.firstMs === null) {
        out.firstMs = performance.now() - t0;
        // Nothing more to learn from this server: stop waiting for the
        // browser's other interfaces to time out.
        if (want === 'srflx') { clearTimeout(timer); resolve(); }
      }
    };
    pc.onicecandidateerror = (e) => out.errors.push({ code: e.errorCode, text: e.errorText || '' });
  });
  pc.createDataChannel('probe');
  await pc.setLocalDescription(await pc.createOffer());
  await done;
  pc.close();
  return out;
}

function waitGathered(pc, ms) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === 'complete') return resolve();
    const timer = setTimeout(resolve, ms);
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') { clearTimeout(timer); resolve(); }
    });
  });
}

function withTimeout(p, ms, what) {
  return Promise.race([p, new Promise((_, reject) => setTimeout(() => reject(new Error(what)), ms))]);
}

// Two peer connections that may use relay candidates only: the data
// channel between them crosses the server twice, as a call between two
// relayed users does.
async function relayCheck(server, cred) {
  const cfg = { iceServers: [iceServer(server, cred)], iceTransportPolicy: 'relay' };
  const a = new RTCPeerConnection(cfg);
  const b = new RTCPeerConnection(cfg);
  try {
    const ch = a.createDataChannel('ping');
    b.ondatachannel = (e) => { e.channel.onmessage = (m) => e.channel.send(m.data); };
    const opened = new Promise((resolve) => { ch.onopen = resolve; });
    await a.setLocalDescription(await a.createOffer());
    await waitGathered(a, GATHER_MS);
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await waitGathered(b, GATHER_MS);
    await a.setRemoteDescription(b.localDescription);
    await withTimeout(opened, RELAY_MS, 'the relayed data channel did not open');
    const rtts = [];
    for (let i = 0; i < 5; i++) {
      const t = performance.now();
      const echoed = new Promise((resolve) => { ch.onmessage = resolve; });
      ch.send('ping ' + i);
      await withTimeout(echoed, 3000, 'a relayed message was lost');
      rtts.push(performance.now() - t);
    }
    rtts.sort((x, y) => x - y);
    return { ok: true, rttMs: rtts[Math.floor(rtts.length / 2)] };
  } catch (e) {
    return { ok: false, error: e.message };
  } finally {
    a.close();
    b.close();
  }
}

function hostPort(server) {
  const m = server.urls.match(/^turns?:|^stun:/);
  return server.urls.slice(m[0].length).split('?')[0];
}

const NAMES = { stun: 'STUN (UDP)', udp: 'TURN over UDP', tcp: 'TURN over TCP', tls: 'TURN over TLS' };

// The same advice `turnpike probe` gives, for what a browser can see.
function advise(server, r) {
  const hp = hostPort(server);
  const proto = server.transport === 'tls' ? 'TLS' : server.transport === 'tcp' ? 'TCP' : 'UDP';
  const codes = r.gather.errors.map((e) => e.code);
  if (codes.includes(401)) return '401 on ' + hp + ': the server did not accept the page\'s credential; check that the server\'s clock is right (the credential carries its expiry time)';
  if (codes.includes(486)) return '486 on ' + hp + ': this user\'s allocation quota is used up';
  if (codes.includes(508)) return '508 on ' + hp + ': the server is out of capacity (relay ports or its allocation quota) or draining';
  if (server.transport === 'stun') {
    return 'no answer on UDP ' + hp + ': the server is not running there, or a firewall between this browser and the server drops UDP';
  }
  if (r.verdict === 'partial') {
    return 'over ' + proto + ' the server gave a relayed address but relayed data did not flow (' + (r.relay.error || 'no answer') +
      '): the relay ports (min-port to max-port, UDP) must be open in the firewall, external-ip must be the server\'s public address when it is behind NAT, ' +
      'and the peer policy must allow the server\'s own relay addresses';
  }
  if (server.transport === 'tls') {
    return 'no relay over TLS ' + hp + ': the port is closed or filtered, or the browser refused the certificate: it must come from a CA the browser trusts and carry the name ' + hp.replace(/:\d+$/, '');
  }
  return 'no answer on ' + proto + ' ' + hp + ': the server is not running there, or a firewall drops ' + proto;
}

function fmtMs(v) { return v === null || v === undefined ? '' : Math.round(v) + ' ms'; }

function render(results, verdict, advice) {
  const tbody = $('results').querySelector('tbody');
  tbody.replaceChildren();
  for (const r of results) {
    const tr = document.createElement('tr');
    tr.dataset.transport = r.transport;
    tr.dataset.verdict = r.verdict;
    const types = [...new Set(r.gather.candidates.map((c) => c.type))].join(', ') || 'none';
    const cells = [NAMES[r.transport], hostPort(r.server), types, r.reflexive || '', r.relayed || '',
      fmtMs(r.gather.firstMs), r.relay && r.relay.ok ? fmtMs(r.relay.rttMs) : ''];
    for (const [i, text] of cells.entries()) {
      const td = document.createElement('td');
      td.textContent = text;
      if (i === 5 || i === 6) td.className = 'num';
      tr.appendChild(td);
    }
    const td = document.createElement('td');
    td.textContent = { pass: 'works', partial: 'allocates, does not relay', fail: 'fails' }[r.verdict];
    td.className = { pass: 'ok', partial: 'warn', fail: 'bad' }[r.verdict];
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
  $('results').hidden = false;
  const v = $('verdict');
  v.hidden = false;
  v.className = 'verdict ' + (verdict.level === 'pass' ? 'ok' : 'bad');
  v.textContent = verdict.text;
  $('advice').replaceChildren(...advice.map((a) => { const li = document.createElement('li'); li.textContent = a; return li; }));
}

async function run() {
  $('run').disabled = true;
  document.body.dataset.state = 'running';
  $('status').textContent = 'asking the server for a credential...';
  const result = { verdict: 'fail', transports: {} };
  try {
    const cred = await getCredential();
    const elsewhere = (cred.not_for_browsers || []).map((x) => ' Also offered, not testable here: ' + x.transport.toUpperCase() + ' on ' + x.where + ' (' + x.why + ').').join('');
    $('credential-note').textContent = 'Credential ' + cred.username + ' (realm ' + cred.realm + '), valid for ' + Math.round(cred.ttl_s / 60) + ' min.' + elsewhere;
    const results = [];
    for (const server of cred.servers) {
      $('status').textContent = 'testing ' + NAMES[server.transport] + ' (' + server.urls + ')...';
      const r = { transport: server.transport, server, gather: await gather(server, cred), relay: null };
      const srflx = r.gather.candidates.find((c) => c.type === 'srflx');
      const relay = r.gather.candidates.find((c) => c.type === 'relay');
      // A relay candidate's raddr is the mapped address in Chromium, the
      // relayed address itself in Firefox.
      const mapped = relay && relay.raddr && relay.raddr + ':' + relay.rport;
      r.relayed = relay ? relay.address + ':' + relay.port : '';
      r.reflexive = srflx ? srflx.address + ':' + srflx.port : mapped && mapped !== r.relayed ? mapped : '';
      if (server.transport === 'stun') {
        r.verdict = srflx ? 'pass' : 'fail';
      } else if (relay) {
        $('status').textContent = 'relaying a data channel over ' + NAMES[server.transport] + '...';
        r.relay = await relayCheck(server, cred);
        r.verdict = r.relay.ok ? 'pass' : 'partial';
      } else {
        r.verdict = 'fail';
      }
      if (r.verdict !== 'pass') r.advice = advise(server, r);
      results.push(r);
      result.transports[server.transport] = {
        verdict: r.verdict, types: [...new Set(r.gather.candidates.map((c) => c.type))],
        reflexive: r.reflexive, relayed: r.relayed, allocationMs: r.gather.firstMs,
        relayRttMs: r.relay && r.relay.ok ? r.relay.rttMs : null, errors: r.gather.errors, advice: r.advice || null,
      };
    }
    const turn = results.filter((r) => r.transport !== 'stun');
    const working = turn.filter((r) => r.verdict === 'pass').map((r) => NAMES[r.transport]);
    let verdict;
    if (turn.length && working.length === turn.length) {
      verdict = { level: 'pass', text: 'Pass: this browser relays through the server over every transport (' + working.join(', ') + ').' };
    } else if (working.length) {
      verdict = { level: 'partial', text: 'Partly: relaying works over ' + working.join(', ') + ' only. Clients that need the others will fail; see below.' };
    } else {
      verdict = { level: 'fail', text: 'Fail: no transport relays through this server from this browser. Calls that need TURN will not connect; see below.' };
    }
    result.verdict = verdict.level;
    render(results, verdict, results.filter((r) => r.advice).map((r) => r.advice));
    $('status').textContent = 'done';
  } catch (e) {
    result.error = e.message;
    render([], { level: 'fail', text: 'The test could not start: ' + e.message }, []);
    $('results').hidden = true;
    $('status').textContent = '';
  }
  window.iceResult = result;
  document.body.dataset.state = 'done';
  $('run').disabled = false;
}

$('run').addEventListener('click', run);
