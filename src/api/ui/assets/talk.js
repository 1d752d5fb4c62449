// Browser calls (SPEC §9), shared by the dashboard's Talk button and public web links.

// A browser call (SPEC §9): the microphone, an offer with every ICE candidate in it (the
// server is ICE-lite: no trickle), POST /api/v1/web-calls, and the agent's audio played.
// `window.__talk` keeps the live call for the browser tests.
export async function startTalk(audio, postUrl) {
  const pc = new RTCPeerConnection({ iceServers: [] });
  const mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } });
  for (const t of mic.getTracks()) pc.addTrack(t, mic);
  pc.ontrack = (e) => {
    audio.srcObject = e.streams[0] || new MediaStream([e.track]);
    audio.play().catch(() => {});
  };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && done());
    setTimeout(done, 3000);
  });
  const offer = pc.localDescription.sdp;
  const r = await fetch(postUrl, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/sdp", Accept: "application/sdp" },
    body: offer,
  });
  const text = await r.text();
  if (r.status !== 201) {
    pc.close();
    for (const t of mic.getTracks()) t.stop();
    let message = `HTTP ${r.status}`;
    try {
      message = JSON.parse(text).error.message;
    } catch {
      /* not JSON */
    }
    throw new Error(message);
  }
  const url = r.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: text });
  const talk = {
    pc,
    mic,
    url,
    id: url.split("/").pop(),
    offer,
    answer: text,
    answeredAt: performance.now(),
    hangUp: postUrl === "/api/v1/web-calls",
  };
  window.__talk = talk;
  return talk;
}

export async function stopTalk(talk) {
  talk.pc.close();
  for (const t of talk.mic.getTracks()) t.stop();
  // A public link's page cannot DELETE (no key): closing the connection ends the call.
  if (talk.hangUp) await fetch(talk.url, { method: "DELETE", credentials: "same-origin" }).catch(() => {});
}

// The public page of a web link (`/talk/<token>`): one button, talking to the tenant's agent.
const button = document.getElementById("talk-link-start");
if (button) {
  const status = document.getElementById("talk-link-status");
  const audio = document.getElementById("talk-link-audio");
  let live = null;
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      if (live) {
        await stopTalk(live);
        live = null;
        status.textContent = "Call ended.";
        button.textContent = "Talk";
      } else {
        status.textContent = "Connecting…";
        live = await startTalk(audio, location.pathname);
        status.textContent = "Connected: say hello.";
        button.textContent = "Hang up";
      }
    } catch (e) {
      status.textContent = `Could not start the call: ${e.message}`;
    }
    button.disabled = false;
  });
}
