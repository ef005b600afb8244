"""HLS and DASH manifests as pure text functions: parse what ffmpeg wrote, finish it for VOD,
write the HLS master playlist, and list every file a manifest references (for publish).

Rules:
- URIs inside our manifests are relative file names in the same version directory; anything
  absolute, with a scheme, a query, or a `..` is refused (`ManifestError`), because the edge
  puts the playback token in the path and every relative URL must inherit it;
- media playlists are VOD (RFC 8216 §4.3.3.5 EXT-X-PLAYLIST-TYPE:VOD), carry
  EXT-X-INDEPENDENT-SEGMENTS (§4.3.5.1: every segment starts with a closed-GOP keyframe) and no
  EXT-X-PROGRAM-DATE-TIME (§4.3.2.6 is for wall-clock mapping, meaningless for an upload);
- BANDWIDTH is the peak segment bit rate and AVERAGE-BANDWIDTH the average segment bit rate,
  both as defined in RFC 8216 §4.1 and measured on the real segment sizes, summed over the
  video rendition and the audio rendition it plays with (§4.3.4.2);
- the DASH segment list of a `SegmentTemplate` without a timeline is
  ceil(period duration / (duration / timescale)) numbers from `startNumber`.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MPD_NS = "urn:mpeg:dash:schema:mpd:2011"
_NS = {"mpd": MPD_NS}


class ManifestError(ValueError):
    """A manifest is malformed or references something it must not."""


# Relative references ------------------------------------------------------------------------

_SAFE_REF = re.compile(r"^[A-Za-z0-9._~-]+(?:/[A-Za-z0-9._~-]+)*$")


def check_ref(uri: str) -> str:
    """A relative file reference inside the version directory, or ManifestError."""
    if not _SAFE_REF.match(uri) or any(p in (".", "..") for p in uri.split("/")):
        raise ManifestError(f"unsafe or non-relative reference {uri!r}")
    return uri


# HLS --------------------------------------------------------------------------------------

_ATTR = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^",]*)')


def parse_attributes(text: str) -> dict[str, str]:
    """RFC 8216 §4.2 attribute list; quoted strings lose their quotes."""
    return {k: v[1:-1] if v.startswith('"') else v for k, v in _ATTR.findall(text)}


@dataclass(frozen=True, slots=True)
class Segment:
    uri: str
    duration: float


@dataclass(frozen=True, slots=True)
class MediaPlaylist:
    map_uri: str | None
    segments: tuple[Segment, ...]
    target_duration: int
    ended: bool

    @property
    def duration(self) -> float:
        return sum(s.duration for s in self.segments)

    def uris(self) -> list[str]:
        head = [self.map_uri] if self.map_uri else []
        return head + [s.uri for s in self.segments]


def _lines(text: str) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines()]
    if not lines or lines[0] != "#EXTM3U":  # §4.3.1.1: the first line MUST be EXTM3U
        raise ManifestError("not an M3U8 playlist (no #EXTM3U)")
    return lines


def parse_media_playlist(text: str) -> MediaPlaylist:
    map_uri: str | None = None
    segments: list[Segment] = []
    target = 0
    ended = False
    pending: float | None = None
    for line in _lines(text)[1:]:
        if not line:
            continue
        if line.startswith("#EXT-X-MAP:"):
            uri = parse_attributes(line[len("#EXT-X-MAP:") :]).get("URI")
            if not uri:
                raise ManifestError("EXT-X-MAP without URI")
            map_uri = check_ref(uri)
        elif line.startswith("#EXTINF:"):
            try:
                pending = float(line[len("#EXTINF:") :].split(",", 1)[0])
            except ValueError:
                raise ManifestError(f"bad EXTINF {line!r}") from None
        elif line.startswith("#EXT-X-TARGETDURATION:"):
            target = int(line.split(":", 1)[1])
        elif line == "#EXT-X-ENDLIST":
            ended = True
        elif not line.startswith("#"):
            if pending is None:  # §4.3.2.1: EXTINF is REQUIRED for each segment
                raise ManifestError(f"segment {line!r} without EXTINF")
            segments.append(Segment(check_ref(line), pending))
            pending = None
    return MediaPlaylist(map_uri, tuple(segments), target, ended)


def finish_media_playlist(text: str) -> str:
    """Turn the dash muxer's HLS media playlist into a VOD one (see module rules)."""
    out: list[str] = []
    for line in _lines(text):
        if not line or line.startswith(
            ("#EXT-X-PROGRAM-DATE-TIME", "#EXT-X-PLAYLIST-TYPE", "#EXT-X-INDEPENDENT-SEGMENTS")
        ):
            continue
        out.append(line)
        if line.startswith("#EXT-X-TARGETDURATION"):
            out.append("#EXT-X-PLAYLIST-TYPE:VOD")  # §4.3.3.5
            out.append("#EXT-X-INDEPENDENT-SEGMENTS")  # §4.3.5.1
    if "#EXT-X-ENDLIST" not in out:
        out.append("#EXT-X-ENDLIST")  # §4.3.3.4: a VOD playlist is complete
    return "\n".join(out) + "\n"


def peak_bit_rate(segments: Iterable[Segment], sizes: Mapping[str, int], target: float) -> int:
    """RFC 8216 §4.1: the largest bit rate of any contiguous set of segments whose total
    duration is between 0.5 and 1.5 times the target duration (bits per second)."""
    segs = list(segments)
    best = 0.0
    for i in range(len(segs)):
        dur = 0.0
        bits = 0
        for seg in segs[i:]:
            dur += seg.duration
            bits += sizes[seg.uri] * 8
            if dur > 1.5 * target:
                break
            if dur >= 0.5 * target:
                best = max(best, bits / dur)
    if best == 0.0:  # shorter than half a target duration in total
        total = sum(s.duration for s in segs)
        best = sum(sizes[s.uri] * 8 for s in segs) / total if total > 0 else 0.0
    return math.ceil(best)


def average_bit_rate(segments: Iterable[Segment], sizes: Mapping[str, int]) -> int:
    """RFC 8216 §4.1: total segment bits divided by the playlist duration."""
    segs = list(segments)
    total = sum(s.duration for s in segs)
    return math.ceil(sum(sizes[s.uri] * 8 for s in segs) / total) if total > 0 else 0


@dataclass(frozen=True, slots=True)
class Variant:
    uri: str
    width: int
    height: int
    frame_rate: float
    codecs: str  # video codec only, e.g. avc1.64001f
    peak_bps: int
    average_bps: int


@dataclass(frozen=True, slots=True)
class AudioRendition:
    uri: str
    codecs: str  # e.g. mp4a.40.2
    channels: int
    peak_bps: int
    average_bps: int


AUDIO_GROUP = "aac"


def build_master(variants: Iterable[Variant], audio: AudioRendition | None) -> str:
    """The master playlist (RFC 8216 §4.3.4): one EXT-X-STREAM-INF per video rendition, all
    sharing one audio rendition group."""
    lines = ["#EXTM3U", "#EXT-X-VERSION:6", "#EXT-X-INDEPENDENT-SEGMENTS"]
    if audio:
        # §4.3.4.1: the audio rendition every variant plays with; CHANNELS is a quoted string
        lines.append(
            f'#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="{AUDIO_GROUP}",NAME="Audio",DEFAULT=YES,'
            f'AUTOSELECT=YES,CHANNELS="{audio.channels}",URI="{check_ref(audio.uri)}"'
        )
    for v in variants:
        codecs = f"{v.codecs},{audio.codecs}" if audio else v.codecs
        peak = v.peak_bps + (audio.peak_bps if audio else 0)
        avg = v.average_bps + (audio.average_bps if audio else 0)
        attrs = [
            f"BANDWIDTH={peak}",  # §4.3.4.2 REQUIRED: peak segment bit rate
            f"AVERAGE-BANDWIDTH={avg}",
            f'CODECS="{codecs}"',  # §4.3.4.2 SHOULD: every codec in the variant
            f"RESOLUTION={v.width}x{v.height}",
            f"FRAME-RATE={v.frame_rate:.3f}",  # §4.3.4.2: rounded to 3 decimal places
        ]
        if audio:
            attrs.append(f'AUDIO="{AUDIO_GROUP}"')
        lines.append("#EXT-X-STREAM-INF:" + ",".join(attrs))
        lines.append(check_ref(v.uri))
    return "\n".join(lines) + "\n"


def parse_master(text: str) -> list[str]:
    """Every playlist a master playlist references: variant URIs and EXT-X-MEDIA URIs."""
    uris: list[str] = []
    expect_uri = False
    for line in _lines(text)[1:]:
        if not line:
            continue
        if line.startswith("#EXT-X-MEDIA:"):
            uri = parse_attributes(line[len("#EXT-X-MEDIA:") :]).get("URI")
            if uri:
                uris.append(check_ref(uri))
        elif line.startswith("#EXT-X-STREAM-INF:"):
            expect_uri = True
        elif line.startswith(("#EXTINF", "#EXT-X-MAP", "#EXT-X-TARGETDURATION")):
            raise ManifestError("a media playlist where a master playlist was expected")
        elif not line.startswith("#"):
            if not expect_uri:  # §4.3.4.2: a URI line follows each EXT-X-STREAM-INF
                raise ManifestError(f"URI {line!r} not preceded by EXT-X-STREAM-INF")
            uris.append(check_ref(line))
            expect_uri = False
    if expect_uri:
        raise ManifestError("EXT-X-STREAM-INF without a URI")
    return uris


# DASH ---------------------------------------------------------------------------------------

_ISO_DURATION = re.compile(
    r"^P(?:(\d+(?:\.\d+)?)Y)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$"
)


def parse_iso_duration(text: str) -> float:
    """xs:duration as used by MPD attributes (years/months taken as 365/30 days)."""
    m = _ISO_DURATION.match(text.strip())
    if not m or text.strip() in ("P", "PT"):
        raise ManifestError(f"bad ISO 8601 duration {text!r}")
    y, mo, d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return ((y * 365 + mo * 30 + d) * 24 + h) * 3600 + mi * 60 + s


_TEMPLATE_VAR = re.compile(r"\$(RepresentationID|Number|Bandwidth|Time)(%0(\d+)d)?\$|\$\$")


def expand_template(template: str, rep_id: str, number: int = 0, bandwidth: int = 0) -> str:
    """ISO/IEC 23009-1 §5.3.9.4.4 identifiers: $RepresentationID$, $Number[%0Nd]$, …"""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, width = m.group(1), m.group(3)
        if name == "RepresentationID":
            return rep_id
        if name == "Time":
            raise ManifestError("$Time$ templates need a SegmentTimeline walk")
        value = number if name == "Number" else bandwidth
        return f"{value:0{int(width)}d}" if width else str(value)

    return _TEMPLATE_VAR.sub(sub, template)


@dataclass(frozen=True, slots=True)
class DashRepresentation:
    id: str
    content_type: str  # video | audio | …
    codecs: str
    bandwidth: int
    width: int | None
    height: int | None
    files: tuple[str, ...]  # init first, then media segments in order


def _find_template(*elements: ET.Element) -> ET.Element | None:
    for el in elements:  # innermost first: Representation, AdaptationSet, Period
        t = el.find("mpd:SegmentTemplate", _NS)
        if t is not None:
            return t
    return None


def _segment_count(template: ET.Element, period_seconds: float) -> int:
    timeline = template.find("mpd:SegmentTimeline", _NS)
    if timeline is not None:
        return sum(1 + int(s.get("r", "0")) for s in timeline.findall("mpd:S", _NS))
    timescale = int(template.get("timescale", "1"))
    duration = int(template.get("duration", "0"))
    if duration <= 0 or timescale <= 0:
        raise ManifestError("SegmentTemplate without a duration or SegmentTimeline")
    # a tiny epsilon so 4.0 s / 2.0 s is 2 segments, not 3, after float rounding
    return max(1, math.ceil(period_seconds * timescale / duration - 1e-6))


def parse_mpd(text: str) -> list[DashRepresentation]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ManifestError(f"MPD is not XML: {e}") from None
    if root.tag != f"{{{MPD_NS}}}MPD":
        raise ManifestError("not an MPD document")
    total = root.get("mediaPresentationDuration")
    reps: list[DashRepresentation] = []
    for period in root.findall("mpd:Period", _NS):
        if period.get("duration"):
            seconds = parse_iso_duration(period.get("duration", ""))
        elif total:
            seconds = parse_iso_duration(total) - parse_iso_duration(period.get("start", "PT0S"))
        else:
            raise ManifestError("no Period@duration or MPD@mediaPresentationDuration")
        for aset in period.findall("mpd:AdaptationSet", _NS):
            for rep in aset.findall("mpd:Representation", _NS):
                rep_id = rep.get("id")
                if rep_id is None:
                    raise ManifestError("Representation without id")
                template = _find_template(rep, aset, period)
                if template is None:
                    raise ManifestError(f"Representation {rep_id} has no SegmentTemplate")
                bandwidth = int(rep.get("bandwidth", "0"))
                files: list[str] = []
                init = template.get("initialization")
                if init:
                    files.append(check_ref(expand_template(init, rep_id, 0, bandwidth)))
                media = template.get("media")
                if not media:
                    raise ManifestError(f"Representation {rep_id} has no media template")
                start = int(template.get("startNumber", "1"))
                for k in range(_segment_count(template, seconds)):
                    files.append(check_ref(expand_template(media, rep_id, start + k, bandwidth)))
                mime = rep.get("mimeType") or aset.get("mimeType") or ""
                ctype = aset.get("contentType") or mime.split("/", 1)[0]
                w, h = rep.get("width"), rep.get("height")
                reps.append(
                    DashRepresentation(
                        id=rep_id,
                        content_type=ctype,
                        codecs=rep.get("codecs") or aset.get("codecs") or "",
                        bandwidth=bandwidth,
                        width=int(w) if w else None,
                        height=int(h) if h else None,
                        files=tuple(files),
                    )
                )
    return reps


_CODEC_FAMILIES: dict[str, str] = {
    "avc1": "avc",
    "avc3": "avc",
    "hvc1": "hevc",
    "hev1": "hevc",
    "av01": "av1",
    "vp09": "vp9",
}


def codec_family(codecs: str) -> str:
    """The decoder a codecs string (RFC 6381) needs: "avc1.64001f" and "avc3.640028" are
    "avc", "hvc1.1.6.L93.90"/"hev1…" "hevc", "av01.0.04M.08" "av1"; an unknown sample entry
    is its own family (its four-character code), an empty string the family ""."""
    entry = codecs.strip().split(",", 1)[0].split(".", 1)[0].strip()
    return _CODEC_FAMILIES.get(entry, entry)


def merge_video_adaptation_sets(text: str) -> str:
    """Move every video Representation into the first video AdaptationSet of its codec family
    in each Period: one set for all H.264 rungs, one for HEVC, one for AV1.

    ffmpeg's dash muxer refuses rungs whose picture aspect ratios differ by rounding (426x240
    vs 640x360) in one set, yet DASH players only switch bit rates inside one AdaptationSet
    (ISO/IEC 23009-1 §5.3.3.1). Representations of different codecs stay in different sets:
    a player picks the set whose codec it can decode and must not be asked to switch decoders
    mid-stream. A set's family is that of its first Representation's @codecs (or the set's own
    @codecs); ffmpeg writes one Representation per set. In a set that received
    Representations, @par is dropped (the rungs differ by a pixel or two; each Representation
    keeps sar="1:1" and its exact size), @bitstreamSwitching dropped and @maxWidth/@maxHeight
    recomputed; a set of a family of one is left as ffmpeg wrote it. Idempotent.
    """
    ET.register_namespace("", MPD_NS)
    ET.register_namespace("xsi", "http://www.w3.org/2001/XMLSchema-instance")
    ET.register_namespace("xlink", "http://www.w3.org/1999/xlink")
    root = ET.fromstring(text)
    for period in root.findall("mpd:Period", _NS):
        groups: dict[str, list[ET.Element]] = {}
        for aset in period.findall("mpd:AdaptationSet", _NS):
            if aset.get("contentType") != "video":
                continue
            first_rep = aset.find("mpd:Representation", _NS)
            codecs = first_rep.get("codecs") if first_rep is not None else None
            codecs = codecs or aset.get("codecs") or ""
            groups.setdefault(codec_family(codecs), []).append(aset)
        for sets in groups.values():
            if len(sets) < 2:
                continue
            first = sets[0]
            for other in sets[1:]:
                for rep in other.findall("mpd:Representation", _NS):
                    first.append(rep)
                period.remove(other)
            reps = first.findall("mpd:Representation", _NS)
            first.attrib.pop("par", None)
            # each rung has its own init segment (its own SPS/PPS), so segments of different
            # rungs can't be concatenated behind one init: no bitstream switching (§5.3.3.2)
            first.attrib.pop("bitstreamSwitching", None)
            first.set("maxWidth", str(max(int(r.get("width", "0")) for r in reps)))
            first.set("maxHeight", str(max(int(r.get("height", "0")) for r in reps)))
    body = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + body + "\n"


def mpd_files(reps: Iterable[DashRepresentation]) -> list[str]:
    return [f for r in reps for f in r.files]
