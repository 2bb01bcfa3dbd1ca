"""Real Chromium accepts the SDP that huddle.rtc.sdp builds: answers to its offers, and the SFU's own offers.

Each test makes a fresh offer in the browser the same way the fixtures in tests/unit/sdp/ were captured
(see test_sdp.py), answers it with `build_answer` and hands the answer back to the same RTCPeerConnection;
then the SFU renegotiates with `build_offer` and Chromium answers. No server is involved: the page is
http://localhost/ served by Playwright's request interception, because getUserMedia needs a secure context
and about:blank is not one. Our candidates point at 127.0.0.1 only; `make test` runs this inside a network
namespace that has nothing but loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from huddle.rtc import sdp
from huddle.rtc.sdp import Candidate, OutgoingTrack
from tests.chromium import chromium

FIXTURES = Path(__file__).parent / "sdp"
FINGERPRINT = ":".join(f"{b:02X}" for b in range(32))
CANDIDATES = [Candidate.host("127.0.0.1", 40000), Candidate.host("127.0.0.1", 40001, transport="tcp")]

PAGE_JS = """
window.makeOffer = async ({simulcast, dataChannel, bundlePolicy}) => {
  if (window.pc) window.pc.close();
  const pc = window.pc = new RTCPeerConnection({bundlePolicy});
  window.tracks = [];
  pc.ontrack = (e) => tracks.push({mid: e.transceiver.mid, streams: e.streams.map(s => s.id)});
  const stream = await navigator.mediaDevices.getUserMedia({audio: true, video: {width: 1280, height: 720}});
  const direction = dataChannel ? 'sendonly' : 'sendrecv';
  pc.addTransceiver(stream.getAudioTracks()[0], {direction, streams: [stream]});
  const init = {direction, streams: [stream]};
  if (simulcast) {
    init.sendEncodings = [
      {rid: 'q', scaleResolutionDownBy: 4}, {rid: 'h', scaleResolutionDownBy: 2}, {rid: 'f'},
    ];
  }
  pc.addTransceiver(stream.getVideoTracks()[0], init);
  if (dataChannel) pc.createDataChannel('chat');
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  return offer.sdp;
};
window.setRemote = async (type, sdp) => {
  try {
    await pc.setRemoteDescription({type, sdp});
  } catch (e) {
    return {error: String(e)};
  }
  if (type !== 'offer') return {};
  const answer = await pc.createAnswer();
  await pc.setLocalDescription(answer);
  return {answer: answer.sdp};
};
window.reoffer = async () => {
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  return offer.sdp;
};
window.state = () => ({
  signaling: pc.signalingState,
  transceivers: pc.getTransceivers().map(t => [t.mid, t.currentDirection]),
  videoRids: pc.getSenders().filter(s => s.track && s.track.kind === 'video')
    .map(s => s.getParameters().encodings.map(e => e.rid || null)),
  tracks,
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.add_init_script(PAGE_JS)
    page.route(
        "http://localhost/",
        lambda route: route.fulfill(body="<!doctype html><title>sdp</title>", content_type="text/html"),
    )
    page.goto("http://localhost/")
    yield page
    page.evaluate("() => window.pc && window.pc.close()")
    context.close()


def make_offer(
    page: Page, *, simulcast: bool = True, data_channel: bool = False, bundle_policy: str = "balanced"
) -> sdp.SessionDescription:
    text = page.evaluate(
        "(o) => makeOffer(o)",
        {"simulcast": simulcast, "dataChannel": data_channel, "bundlePolicy": bundle_policy},
    )
    return sdp.parse(text)


def answer_to(desc: sdp.SessionDescription, **kwargs: Any) -> sdp.SessionDescription:
    return sdp.build_answer(
        desc,
        ice_ufrag="sfuA",
        ice_pwd="0123456789abcdefghijkl+/",
        fingerprint_sha256=FINGERPRINT,
        candidates=CANDIDATES,
        **kwargs,
    )


def set_answer(page: Page, answer: sdp.SessionDescription) -> None:
    result = page.evaluate("([t, s]) => setRemote(t, s)", ["answer", sdp.serialize(answer)])
    assert "error" not in result, f"{result['error']}\n{sdp.serialize(answer)}"


def chromium_answers(page: Page, offer: sdp.SessionDescription) -> sdp.SessionDescription:
    result = page.evaluate("([t, s]) => setRemote(t, s)", ["offer", sdp.serialize(offer)])
    assert "error" not in result, f"{result['error']}\n{sdp.serialize(offer)}"
    answer = sdp.parse(result["answer"])
    sdp.check_answer(offer, answer)
    return answer


def state(page: Page) -> dict[str, Any]:
    return page.evaluate("() => state()")


def shape(desc: sdp.SessionDescription) -> list[tuple]:
    """What our code depends on in a browser offer, leaving out what changes call to call or by version."""
    return [
        (
            m.kind,
            m.mid,
            m.direction,
            m.rtcp_mux,
            [(r.id, r.direction) for r in m.rids],
            m.simulcast,
            [g.semantics for g in m.ssrc_groups],
            [c.name for c in sdp.choose_codecs(m)],
        )
        for m in desc.media
    ]


@pytest.mark.parametrize(
    ("fixture", "options"),
    [
        ("chromium_simulcast_offer.sdp", {"simulcast": True}),
        ("chromium_offer.sdp", {"simulcast": False}),
        ("chromium_datachannel_offer.sdp", {"simulcast": True, "data_channel": True}),
    ],
)
def test_live_offer_matches_fixture(page, fixture, options):
    # When this fails after a Chromium upgrade, recapture the fixtures (see test_sdp.py) and look at the diff.
    assert shape(make_offer(page, **options)) == shape(sdp.parse((FIXTURES / fixture).read_text()))


@pytest.mark.parametrize("bundle_policy", ["balanced", "max-bundle"])
def test_chromium_accepts_answer_to_simulcast_offer(page, bundle_policy):
    offer = make_offer(page, simulcast=True, bundle_policy=bundle_policy)
    set_answer(page, answer_to(offer))
    now = state(page)
    assert now["signaling"] == "stable"
    assert now["transceivers"] == [["0", "sendonly"], ["1", "sendonly"]]
    # Still three layers: an answer that declines simulcast would leave Chromium sending only "q".
    assert now["videoRids"] == [["q", "h", "f"]]


def test_chromium_accepts_answer_to_plain_offer(page):
    set_answer(page, answer_to(make_offer(page, simulcast=False)))
    assert state(page)["transceivers"] == [["0", "sendonly"], ["1", "sendonly"]]


def test_chromium_accepts_answer_rejecting_its_data_channel(page):
    offer = make_offer(page, data_channel=True)
    answer = answer_to(offer)
    assert answer.media[2].rejected and answer.media[2].mid == offer.media[2].mid
    set_answer(page, answer)
    assert state(page)["transceivers"] == [["0", "sendonly"], ["1", "sendonly"]]


def test_chromium_accepts_unusable_bundle_tag_answered_inactive(page):
    # Under max-bundle Chromium refuses an answer that rejects the BUNDLE tag (audio here) outright.
    offer = make_offer(page, bundle_policy="max-bundle")
    answer = answer_to(offer, supported_codecs=[sdp.VP8])
    assert answer.media[0].direction == "inactive" and not answer.media[0].rejected
    set_answer(page, answer)
    assert state(page)["transceivers"] == [["0", "inactive"], ["1", "sendonly"]]


def test_chromium_renegotiation(page):
    offer = make_offer(page, simulcast=True, bundle_policy="max-bundle")
    current = answer_to(offer)
    set_answer(page, current)

    # The SFU adds other participants' tracks.
    b_audio = OutgoingTrack("audio", 1111, "peer-b", "streamB", "audioB")
    b_video = OutgoingTrack("video", 2222, "peer-b", "streamB", "videoB", rtx_ssrc=2223)
    c_video = OutgoingTrack("video", 3333, "peer-c", "streamC", "videoC", rtx_ssrc=3334)
    current, mids = sdp.build_offer(current, add=[b_audio, b_video, c_video])
    assert mids == ["2", "3", "4"]
    answer = chromium_answers(page, current)
    assert [m.direction for m in answer.media] == ["sendonly", "sendonly", "recvonly", "recvonly", "recvonly"]
    # Chromium keeps its simulcast when the SFU is the offerer (our a=simulcast:recv, its a=simulcast:send).
    assert answer.media[1].simulcast == sdp.Simulcast(
        send=[[sdp.RidChoice("q")], [sdp.RidChoice("h")], [sdp.RidChoice("f")]]
    )
    assert state(page)["videoRids"] == [["q", "h", "f"]]
    assert [(t["mid"], t["streams"]) for t in state(page)["tracks"]] == [
        ("2", ["streamB"]),
        ("3", ["streamB"]),
        ("4", ["streamC"]),
    ]

    # B leaves: its video section goes inactive (kept for reuse), its audio is stopped (port 0).
    current, _ = sdp.build_offer(current, remove=["3"], stop=["2"], remote=answer)
    answer = chromium_answers(page, current)
    assert [(m.mid, m.port == 0, m.direction) for m in answer.media[2:]] == [
        ("2", True, "inactive"),
        ("3", False, "inactive"),
        ("4", False, "recvonly"),
    ]

    # D's video reuses mid 3; E's audio recycles the stopped slot under a new mid.
    d_video = OutgoingTrack("video", 4444, "peer-d", "streamD", "videoD", rtx_ssrc=4445)
    e_audio = OutgoingTrack("audio", 5555, "peer-e", "streamE", "audioE")
    current, mids = sdp.build_offer(current, add=[d_video, e_audio], reusable=["3"], remote=answer)
    assert mids == ["3", "5"]
    answer = chromium_answers(page, current)
    assert [m.mid for m in answer.media] == ["0", "1", "5", "3", "4"]
    assert [(t["mid"], t["streams"]) for t in state(page)["tracks"]][3:] == [
        ("3", ["streamD"]),
        ("5", ["streamE"]),
    ]

    # The browser offers again (say, to add a screen share later): our answer keeps sending on our sections,
    # keeps the DTLS role, and Chromium takes it.
    reoffer = sdp.parse(page.evaluate("() => reoffer()"))
    assert [m.mid for m in reoffer.media] == ["0", "1", "5", "3", "4"]
    assert {m.setup for m in reoffer.media} == {"actpass"}
    reanswer = answer_to(
        reoffer, outgoing=sdp.outgoing_tracks(current), session_version=current.origin.session_version + 1
    )
    assert reanswer.setup == "passive"
    set_answer(page, reanswer)
    now = state(page)
    assert now["signaling"] == "stable"
    assert sorted(now["transceivers"]) == [
        ["0", "sendonly"],
        ["1", "sendonly"],
        ["3", "recvonly"],
        ["4", "recvonly"],
        ["5", "recvonly"],
    ]
    assert now["videoRids"] == [["q", "h", "f"]]
