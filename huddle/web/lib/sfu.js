// "sfu" mode: two RTCPeerConnections with the server, publish and subscribe.

import { HuddleError } from './errors.js';
import { SCREEN_MAX_BITRATE, screenKey, setScreenDegradation } from './screen.js';
import { mediaArrives } from './stats.js';
import { MAX_ICE_RESTARTS, Transport } from './transport.js';

// SFU mode: the camera is published as three simulcast encodings (docs/protocol.md, "Simulcast publishing"),
// lowest first. The server turns them on and off with `publisher_layers` (dynacast).
export const SIMULCAST_ENCODINGS = Object.freeze([
  Object.freeze({ rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 }),
  Object.freeze({ rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 }),
  Object.freeze({ rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1_500_000 }),
]);
// Each simulcast layer keeps its size (the SFU chooses layers by size): when bandwidth or CPU run short, the
// browser lowers the frame rate or turns top layers off, rather than shrinking a layer. Without this, a lone
// active `f` started while the bandwidth estimate was low stayed at 480x270 for many seconds (Chromium 156).
const SIMULCAST_DEGRADATION = 'maintain-resolution';

/** The participant ids under which SfuTransport.connections() lists its two peer connections. */
export const SFU_PUBLISH_ID = 'sfu:publish';
export const SFU_SUBSCRIBE_ID = 'sfu:subscribe';

/**
 * "sfu" mode (docs/protocol.md, "SFU mode"): two RTCPeerConnections with the server, so that neither side
 * ever waits for the other's offer.
 *   publish    we offer (`sfu_offer` pc "publish") our microphone and camera as sendonly transceivers: audio
 *              as one encoding, the camera as three simulcast encodings (rid q, h, f: 1/4, 1/2 and full size);
 *              the server answers (`sfu_answer`). Offered again when the local tracks change and for ICE
 *              restarts, one offer at a time. `publisher_layers` from the server pauses and resumes the
 *              camera's encodings (setPublisherLayers). Each encoding keeps its size (degradationPreference
 *              'maintain-resolution'), so that a rid always means the same resolution to the SFU.
 *   subscribe  the server offers (`sfu_offer` pc "subscribe" with a `revision`) one sendonly m-section per
 *              remote track; we answer (`sfu_answer`, same revision). Offers are applied strictly in order.
 * The server is ICE-lite and learns our address from our STUN checks: no candidates go either way. With
 * iceTransportPolicy 'relay' those checks (and the media) come from our TURN allocation, so the address it
 * learns is the relay's; over ICE-TCP or TURN over TCP/TLS a browser whose UDP is blocked still gets through.
 *
 * Remote tracks are grouped by the stream id of their msid (= the publishing participant's id) into one
 * MediaStream per participant holding their audio and video, reported with the same `track` events as
 * MeshTransport. A screen share's tracks come in a stream of their own, `<participant id>~screen`, reported
 * under that key. A track goes again (event `trackRemoved`) when the server's offer makes its m-section
 * inactive or rejects it (port 0), when it ends, or when its msid stream loses it.
 *
 * Our own screen share (setScreen) is published on transceivers of its own, one encoding, named in the publish
 * offer's `sources`; when it stops they go inactive (kept for the next share) and are left out of `sources`.
 */
export class SfuTransport extends Transport {
  constructor(options) {
    super(options);
    this.publishPc = null;
    this.subscribePc = null;
    this.closed = false;
    this.revision = null; // of the last subscribe offer applied
    this.streams = new Map(); // participant id -> MediaStream (what the page shows)
    this._owners = new Map(); // remote MediaStreamTrack -> participant id
    this._watched = new WeakSet(); // tracks and msid streams we listen to already
    this._publishQueue = Promise.resolve();
    this._subscribeQueue = Promise.resolve();
    this._offerOut = false; // a publish offer waits for its answer
    this._wanted = null; // {iceRestart}: another publish offer is due once the answer is in
    this._offers = 0;
    this._iceRestarts = 0;
    this._layersWanted = null; // Set of rids the server wants on (publisher_layers); null = all of them
    this._layersBusy = false; // a getParameters/setParameters round is running
    this._degraded = new WeakSet(); // senders given SIMULCAST_DEGRADATION
    this.screen = options.screen || null; // our screen share: {video, audio, stream} or null
    this._screenTransceivers = { video: null, audio: null }; // kept across shares, inactive in between
  }

  get mode() {
    return 'sfu';
  }

  /** The camera's simulcast layers the server last asked for (null: none asked yet, all are on). */
  get publisherLayers() {
    return this._layersWanted ? [...this._layersWanted] : null;
  }

  start() {
    if (this.publishPc) return;
    const config = {
      iceServers: this.iceServers, iceTransportPolicy: this.iceTransportPolicy, bundlePolicy: 'max-bundle',
    };
    const pub = new RTCPeerConnection(config);
    const sub = new RTCPeerConnection(config);
    this.publishPc = pub;
    this.subscribePc = sub;
    // No onicecandidate: the ICE-lite server needs none of our candidates.
    pub.onconnectionstatechange = () => this._onPublishState();
    pub.oniceconnectionstatechange = () => this._onPublishState();
    sub.ontrack = (event) => this._onTrack(event);
    sub.onconnectionstatechange = () => this._onSubscribeState();
    sub.oniceconnectionstatechange = () => this._onSubscribeState();
    this._enqueuePublish(async () => this._syncPublishTransceivers());
    this._negotiatePublish(false);
  }

  /** Remote tracks are announced as they come; a participant we hear of later gets theirs again. */
  connectTo(participantId) {
    this._announce(participantId);
  }

  expect(participantId) {
    this._announce(participantId);
  }

  /** `sfu_offer` (subscribe), `sfu_answer` (publish), and `error` replies to our own SFU messages. */
  handleSignal(message) {
    if (this.closed) return;
    if (message.type === 'sfu_offer' && message.pc === 'subscribe') this._applySubscribeOffer(message);
    else if (message.type === 'sfu_answer' && message.pc === 'publish') this._applyPublishAnswer(message.sdp);
    else if (message.type === 'error') this._onError(message);
  }

  /** The participant left: forget their stream (the server's next offer retires their m-sections). */
  remove(participantId) {
    const screen = screenKey(participantId);
    this.streams.delete(participantId);
    this.streams.delete(screen);
    for (const [track, owner] of [...this._owners]) {
      if (owner === participantId || owner === screen) this._owners.delete(track);
    }
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    for (const pc of [this.publishPc, this.subscribePc]) {
      if (!pc) continue;
      pc.ontrack = pc.onconnectionstatechange = pc.oniceconnectionstatechange = null;
      pc.close();
    }
    this.streams.clear();
    this._owners.clear();
  }

  connections() {
    const out = [];
    if (this.publishPc) out.push({ participantId: SFU_PUBLISH_ID, pc: this.publishPc });
    if (this.subscribePc) out.push({ participantId: SFU_SUBSCRIBE_ID, pc: this.subscribePc });
    return out;
  }

  /**
   * ICE restart of the publish connection (after our signaling came back): a new offer with fresh ICE
   * credentials. An offer whose answer was lost with the old socket is dropped first. The subscribe side is
   * restarted by the server's next offer.
   */
  restartIce() {
    this._enqueuePublish(async () => {
      this._offerOut = false;
      this._wanted = null;
    });
    this._negotiatePublish(true);
  }

  /**
   * `publisher_layers` (dynacast): keep the camera's encodings whose rid is in `active` on, pause the others.
   * The calls to setParameters are serialised; wishes that come while one is running are merged into the
   * next round, so the last one wins.
   */
  setPublisherLayers(active) {
    if (!Array.isArray(active)) return;
    this._layersWanted = new Set(active.filter((rid) => typeof rid === 'string'));
    this._applySenderParameters();
  }

  /** New local tracks (e.g. a camera that came later): put them on the publish connection, offer again. */
  setLocalTracks(localTracks) {
    this.localTracks = localTracks;
    this._enqueuePublish(async () => {
      if (await this._syncPublishTransceivers()) this._negotiatePublish(false);
    });
  }

  /** Our screen share ({video, audio, stream}) starts, or stops (null): published or retired, offered again. */
  setScreen(screen) {
    this.screen = screen || null;
    this._enqueuePublish(async () => {
      if (await this._syncScreenTransceivers()) this._negotiatePublish(false);
    });
  }

  /**
   * Whether media from the SFU is really arriving on `track`: for video at least one decoded frame, for audio
   * at least one packet.
   */
  async hasMedia(track) {
    if (!this.subscribePc || this.closed) return false;
    const transceiver = this.subscribePc.getTransceivers().find((t) => t.receiver.track === track);
    if (!transceiver) return false;
    return mediaArrives(transceiver.receiver, track);
  }

  /** The subscribe connection's state, in the form of `peer-state` events. */
  subscribeState() {
    const pc = this.subscribePc;
    const connectionState = pc ? pc.connectionState : 'new';
    const iceConnectionState = pc ? pc.iceConnectionState : 'new';
    return { connectionState, iceConnectionState, state: connectionState };
  }

  // --- publish ---

  _enqueuePublish(task) {
    this._publishQueue = this._publishQueue.then(async () => {
      if (this.closed) return;
      try {
        await task();
      } catch (err) {
        if (!this.closed) {
          this.events.error(new HuddleError('peer_error', `publishing to the server failed: ${err.message}`,
            { cause: err }));
        }
      }
    });
  }

  /** Puts the local tracks on sendonly transceivers; true when the offer has to change. */
  async _syncPublishTransceivers() {
    const pc = this.publishPc;
    let changed = false;
    for (const kind of ['audio', 'video']) {
      const track = this.publish ? this.localTracks?.[kind] || null : null;
      const transceiver = pc.getTransceivers().find((t) => t.receiver.track.kind === kind
        && !this._isScreenTransceiver(t) && t.currentDirection !== 'stopped' && t.direction !== 'stopped');
      if (!transceiver) {
        if (!track) continue;
        const init = { direction: 'sendonly' };
        if (this.localTracks.stream) init.streams = [this.localTracks.stream];
        if (kind === 'video') {
          // Simulcast; layers the server has already said nobody needs start paused.
          init.sendEncodings = SIMULCAST_ENCODINGS.map((encoding) => ({
            ...encoding, active: this._layersWanted ? this._layersWanted.has(encoding.rid) : true,
          }));
        }
        pc.addTransceiver(track, init);
        if (kind === 'video') await this._applySenderParameters(); // before the offer
        changed = true;
        continue;
      }
      if (transceiver.sender.track !== track) await transceiver.sender.replaceTrack(track);
      const wanted = track ? 'sendonly' : 'inactive';
      if (transceiver.direction !== wanted) {
        transceiver.direction = wanted;
        changed = true;
      }
    }
    if (await this._syncScreenTransceivers()) changed = true;
    return changed;
  }

  _isScreenTransceiver(transceiver) {
    return transceiver === this._screenTransceivers.video || transceiver === this._screenTransceivers.audio;
  }

  /**
   * Puts our screen share's tracks on their own sendonly transceivers (made on the first share, reused after),
   * or takes them off (inactive); true when the offer has to change.
   */
  async _syncScreenTransceivers() {
    const pc = this.publishPc;
    let changed = false;
    for (const kind of ['video', 'audio']) {
      const track = this.publish ? this.screen?.[kind] || null : null;
      let transceiver = this._screenTransceivers[kind];
      if (!transceiver) {
        if (!track) continue;
        const init = { direction: 'sendonly', streams: this.screen.stream ? [this.screen.stream] : [] };
        if (kind === 'video') init.sendEncodings = [{ maxBitrate: SCREEN_MAX_BITRATE }];
        transceiver = pc.addTransceiver(track, init);
        this._screenTransceivers[kind] = transceiver;
        if (kind === 'video') await setScreenDegradation(transceiver.sender);
        changed = true;
        continue;
      }
      if (transceiver.sender.track !== track) await transceiver.sender.replaceTrack(track);
      if (track && this.screen.stream && transceiver.sender.setStreams) {
        transceiver.sender.setStreams(this.screen.stream);
      }
      const wanted = track ? 'sendonly' : 'inactive';
      if (transceiver.direction !== wanted) {
        transceiver.direction = wanted;
        changed = true;
      }
    }
    return changed;
  }

  /** `sources` of a publish offer: the mids of the screen's sending sections (known once the offer is set). */
  _screenSources() {
    const sources = {};
    for (const [kind, source] of [['video', 'screen'], ['audio', 'screen_audio']]) {
      const transceiver = this._screenTransceivers[kind];
      if (transceiver && transceiver.mid !== null && transceiver.direction === 'sendonly'
        && transceiver.sender.track) {
        sources[transceiver.mid] = source;
      }
    }
    return sources;
  }

  /** The RTCRtpSender of the camera on the publish connection (null when there is none). */
  _videoSender() {
    const pc = this.publishPc;
    if (!pc || this.closed) return null;
    const transceiver = pc.getTransceivers().find((t) => t.receiver.track.kind === 'video'
      && !this._isScreenTransceiver(t) && t.currentDirection !== 'stopped' && t.direction !== 'stopped');
    return transceiver ? transceiver.sender : null;
  }

  /**
   * Brings the camera sender's parameters in line: the simulcast degradation preference, and the encodings
   * on and off as _layersWanted says. One getParameters/setParameters round at a time.
   */
  async _applySenderParameters() {
    if (this._layersBusy) return; // the running round picks up the newest wish when it is done
    this._layersBusy = true;
    try {
      // Each round applies the newest wish; a wish that came during the await makes another round.
      for (let round = 0; round < 10 && !this.closed; round += 1) {
        const sender = this._videoSender();
        if (!sender) return;
        const wanted = this._layersWanted;
        // getParameters and setParameters with no await between them (their transaction id must match).
        const parameters = sender.getParameters();
        const encodings = parameters.encodings || [];
        let changed = false;
        if (encodings.length > 1 && !this._degraded.has(sender)) {
          // Once per sender: a browser without the setting ignores it.
          this._degraded.add(sender);
          parameters.degradationPreference = SIMULCAST_DEGRADATION;
          changed = true;
        }
        for (const encoding of wanted ? encodings : []) {
          if (!encoding.rid) continue; // a single encoding (no simulcast): nothing to pause
          const active = wanted.has(encoding.rid);
          if (encoding.active !== active) {
            encoding.active = active;
            changed = true;
          }
        }
        if (!changed) return;
        await sender.setParameters(parameters);
      }
    } catch (err) {
      // Not fatal: the layers stay as they were; the next publisher_layers tries again.
      console.warn('huddle: could not change the simulcast layers', err);
    } finally {
      this._layersBusy = false;
    }
  }

  /** One publish offer at a time: a wish for another one while an offer is out waits for its answer. */
  _negotiatePublish(iceRestart) {
    this._enqueuePublish(async () => {
      if (this._offerOut) {
        this._wanted = { iceRestart: Boolean(iceRestart || this._wanted?.iceRestart) };
        return;
      }
      const pc = this.publishPc;
      if (pc.getTransceivers().length === 0) return; // nothing to publish (no devices, or no permission)
      if (pc.signalingState === 'have-local-offer') await pc.setLocalDescription({ type: 'rollback' });
      const offer = await pc.createOffer(iceRestart ? { iceRestart: true } : undefined);
      await pc.setLocalDescription(offer);
      this._offerOut = true;
      this._offers += 1;
      // The id comes back on an `error` (bad_sdp) only; the answer itself carries none.
      const message = { type: 'sfu_offer', id: `publish-${this._offers}`, pc: 'publish', sdp: pc.localDescription.sdp };
      const sources = this._screenSources();
      if (Object.keys(sources).length > 0) message.sources = sources;
      this.send(message);
      // Not sent (no socket): restartIce() offers again once signaling is back.
    });
  }

  _applyPublishAnswer(sdp) {
    this._enqueuePublish(async () => {
      const pc = this.publishPc;
      if (pc.signalingState !== 'have-local-offer') return; // stale or duplicate answer
      this._offerOut = false;
      await pc.setRemoteDescription({ type: 'answer', sdp });
      this._followUp();
    });
  }

  _followUp() {
    const wanted = this._wanted;
    this._wanted = null;
    if (wanted) this._negotiatePublish(wanted.iceRestart);
  }

  _onError(message) {
    if (typeof message.id !== 'string' || !message.id.startsWith('publish-')) return;
    // The server refused our publish offer: back to the last agreed state; a later change offers again.
    this._enqueuePublish(async () => {
      if (!this._offerOut) return;
      this._offerOut = false;
      if (this.publishPc.signalingState === 'have-local-offer') {
        await this.publishPc.setLocalDescription({ type: 'rollback' });
      }
      this._followUp();
    });
  }

  _onPublishState() {
    const pc = this.publishPc;
    const { connectionState, iceConnectionState } = pc;
    this.events.peerState(SFU_PUBLISH_ID, { connectionState, iceConnectionState, state: connectionState });
    if (connectionState === 'failed' && this._iceRestarts < MAX_ICE_RESTARTS) {
      this._iceRestarts += 1;
      this._negotiatePublish(true);
    } else if (connectionState === 'connected') {
      this._iceRestarts = 0;
    }
  }

  // --- subscribe ---

  _applySubscribeOffer(message) {
    this._subscribeQueue = this._subscribeQueue.then(async () => {
      if (this.closed) return;
      const pc = this.subscribePc;
      try {
        if (pc.signalingState !== 'stable') await pc.setLocalDescription({ type: 'rollback' });
        await pc.setRemoteDescription({ type: 'offer', sdp: message.sdp });
        const answer = await pc.createAnswer();
        await pc.setLocalDescription(answer);
        const reply = { type: 'sfu_answer', pc: 'subscribe', sdp: pc.localDescription.sdp };
        if (message.revision !== undefined) {
          reply.revision = message.revision;
          reply.id = `subscribe-${message.revision}`;
        }
        this.revision = message.revision ?? this.revision;
        this.send(reply);
      } catch (err) {
        if (!this.closed) {
          this.events.error(new HuddleError('peer_error',
            `could not apply the server's offer (revision ${message.revision}): ${err.message}`, { cause: err }));
        }
      }
      if (!this.closed) this._dropRetiredTracks();
    });
  }

  _onTrack(event) {
    const { track } = event;
    const msid = event.streams && event.streams[0];
    if (!msid) {
      console.debug('huddle: SFU track without a stream id ignored', track.id);
      return;
    }
    if (!this._watched.has(track)) {
      this._watched.add(track);
      track.addEventListener('ended', () => this._drop(track));
    }
    if (!this._watched.has(msid)) {
      this._watched.add(msid);
      msid.addEventListener('removetrack', (e) => {
        if (this._owners.get(e.track) === msid.id) this._drop(e.track);
      });
    }
    this._attach(msid.id, track);
  }

  _attach(participantId, track) {
    const previous = this._owners.get(track);
    if (previous !== undefined && previous !== participantId) this._drop(track); // m-section reused
    let stream = this.streams.get(participantId);
    if (!stream) {
      stream = new MediaStream();
      this.streams.set(participantId, stream);
    }
    for (const old of stream.getTracks()) {
      if (old !== track && old.kind === track.kind) {
        stream.removeTrack(old);
        this._owners.delete(old);
      }
    }
    if (!stream.getTracks().includes(track)) stream.addTrack(track);
    this._owners.set(track, participantId);
    this.events.track(participantId, stream, track);
    this.events.peerState(participantId, this.subscribeState());
  }

  _drop(track) {
    const participantId = this._owners.get(track);
    if (participantId === undefined) return;
    this._owners.delete(track);
    const stream = this.streams.get(participantId);
    if (!stream || !stream.getTracks().includes(track)) return;
    stream.removeTrack(track);
    this.events.trackRemoved(participantId, stream, track);
  }

  /** After an offer: tracks whose m-section no longer receives (inactive, or port 0) are gone. */
  _dropRetiredTracks() {
    for (const transceiver of this.subscribePc.getTransceivers()) {
      const track = transceiver.receiver.track;
      if (!this._owners.has(track)) continue;
      const receiving = transceiver.currentDirection === 'recvonly' || transceiver.currentDirection === 'sendrecv';
      if (!receiving) this._drop(track);
    }
  }

  _announce(participantId) {
    const stream = this.streams.get(participantId);
    if (!stream) return;
    for (const track of stream.getTracks()) this.events.track(participantId, stream, track);
    this.events.peerState(participantId, this.subscribeState());
  }

  _onSubscribeState() {
    const states = this.subscribeState();
    this.events.peerState(SFU_SUBSCRIBE_ID, states);
    for (const participantId of this.streams.keys()) this.events.peerState(participantId, states);
  }
}
