"""Strip page boilerplate that survives main-text extraction: `strip_boilerplate(text) -> text`.

Extractors (trafilatura, resiliparse) keep or drop whole blocks, and the page furniture around
an article often comes through as *lines* of its own: a share bar, a "Related articles" list, a
newsletter box, a copyright footer, the title and byline above the body. Each rule below looks
at the shape of a line and its neighbours, never at a site name or a domain, so it applies to
pages nobody has seen. The rules lean towards keeping the body. Almost every per-line rule looks
only at lines of at most 160 characters; a few unambiguous ones (credits in parentheses, legal
prefixes, CTAs, rendering notices) reach 400; longer lines, which are paragraphs, are never
touched. Pure, deterministic, stdlib `re` only, linear in the length of the text: about
0.3 ms of CPU for an average 4.5 kB page.

Per-line rules (on the line with its whitespace collapsed, so a no-break space counts as a space):

 1. UI-only lines: every word is interface vocabulary ("Share", "Tweet", "Share on Facebook",
    "Permalink 34 Comments Back to top", "Advertisement", "Close", "Get short URL"). Words the
    markup glued together ("FacebookShare") are split where the case changes. Lines made only of
    function words ("And", "To, to, to--") and one-word labels ending in ":" ("Page:", a play's
    speaker) are kept.
 2. Navigation phrases that fill the whole line: "Read more", "Continue reading below", "You may
    also like...", "Related articles", "Most read in World News", "Don't miss", "Explore
    further", "About the author", "Skip to content", "Tags ...", "Filed under: ...", "12
    comments", "Leave a comment", "Image 1 of 8", and the same labels in a few other major
    languages ("Lesen Sie auch", "Leia mais", "Publicidad", "Anzeige", "関連記事", ...).
 3. Labelled teasers: "Related: <headline>", "SEE MORE: <headline>", "Also read: ...", and
    headlines of at least 3 words ending in a tag such as "[VIDEO]" or "[INSIGHT]". These are
    links to other pages written out as text.
 4. Calls to action: newsletter and subscription boxes ("Subscribe to our newsletter",
    "Thanks for signing up!", "... delivered to your inbox"), app prompts, "Follow us / him /
    her on Twitter", "If you enjoyed this article, ...", all-capitals "CLICK HERE ..." lines,
    "This slideshow requires JavaScript". A body sentence that only mentions subscribers or a
    newsletter ("sign up additional subscribers") is not a call to action and is kept.
 5. Legal footer: a line that starts with "©" / "Copyright", or contains "All rights reserved"
    or a cookie notice ("we use cookies", "cookie policy"); short lines (<= 12 words) that name
    a "Privacy Policy" or "Terms of Use".
 6. Bylines and stamps: "By" followed by a name ("By Jane Doe and John Roe"; a verse line such
    as "By this we gather" is not name-shaped and is kept), "Additional reporting by ...", a
    lone wire-agency name ("The Associated Press"), "Source: ...", reading-time labels ("4 min
    read"), and date stamps: a line that is only a date or time, optionally after
    "Published/Updated/Posted" ("Published Monday, November 18, 2019 8:22AM EST", "Updated at
    1:23 p.m."), ISO timestamps, and short lines that pair a name with one dated timestamp
    ("Chris Davies - Nov 19, 2019, 10:31 pm CST"). A date range ("29 November 2018 | 20 January
    2019") is kept because two dates mark an event, not a stamp. A tweet attribution with an
    "@handle" is also kept.
 7. Captions and credits: a line that ends in a credit in parentheses ("(Photo: ...)", "(Image:
    GETTY)", "(NASA via AP, File)"), that starts with "Photo:" / "Image:" / "Credit:", or that is
    short and unpunctuated and names a photo agency ("Jane Doe | Bloomberg | Getty Images").
    Also media counts such as "(16 Videos)", bare image-file URLs, and WordPress shortcodes the
    template failed to render ("[button link=...]...[/button]").

Structural rules (position and neighbours):

 8. No prose at all: the text has >= 3 lines, none longer than 150 chars, none of them a
    sentence (>= 40 chars ending in sentence punctuation or containing a sentence break), and at
    most 20% of them end in punctuation. That is a list of links (a hub page the extractor fell
    back to), and the result is "". Verse is not affected, because its lines end in
    punctuation.
 9. A heading such as "Related", "More from X", "Don't miss" or "You may also like" also takes
    the run of headline-shaped lines right under it, because that run is the list it introduces.
10. In a link list printed with a lone separator line between items ("-", "|", "•"), a short
    line with separators on both sides is a list item and is dropped.
11. Link-list runs: >= 2 consecutive bulleted Title-Case headlines at the very end of the text
    ("- 15 Amazing Images of Stars", at most 2 lines after them), and >= 2 consecutive "Section |
    Headline" lines. A bulleted list in the middle of the body is kept, even in Title Case.
12. Leading title: the page's own URL, and then the first kept line if it is headline-shaped
    (4-25 words, no sentence-final punctuation, no sentence break, not all capitals, not a
    bullet), are dropped: this is the title, which the body does not repeat. The headline-shaped
    line right after it (the standfirst) goes too, and so does one short section label above it
    ("Opinion", "TECH"), but only when a title follows.
13. A lone "By" line takes with it the short name line that follows.
14. Repeats: a line of >= 8 words that also appears within the 8 lines before it (ignoring a
    list bullet) is a template repeat, such as a gallery caption printed once per slide. Only
    the first occurrence is kept. Recipes and schedules that repeat lines far apart are not
    affected.

What it does not try: a company's "About X" paragraphs at the end of a press release, author
bios, disclaimers, affiliate disclosures. These are full sentences, and whether they belong to
the text differs from page to page (the benchmark's gold text often keeps them), so a rule that
removes them costs more body text than it saves.
"""

from __future__ import annotations

import re

__all__ = ["strip_boilerplate"]

_SHORT = 160  # most per-line rules look at lines up to this many characters ...
_LONG = 400  # ... a few unambiguous ones up to this many; longer lines are paragraphs
LEAD_MAX = 2  # rule 12: title + standfirst
LEAD_LABELS = 1  # rule 12: section labels above the title
REPEAT_MIN_WORDS, REPEAT_WINDOW = 8, 8  # rule 14

_WORD = re.compile(r"\w+")
_DIGIT = re.compile(r"\d")
_SENTENCE_END = tuple('.!?…:;"”’»)]。！？」』')
_VERSE_END = _SENTENCE_END + (",", "-", "–", "—")
_HEADLINE_BAD_END = _SENTENCE_END + tuple("([{,-–—/")
_SENTENCE_BREAK = re.compile(r"\w[.!?] +[A-Z]")
_SEPARATOR = re.compile(r"^[-|•·/*–—]{1,3}$")
_I, _X = re.IGNORECASE, re.IGNORECASE | re.VERBOSE

# ----------------------------------------------------------------- 1. UI-only lines

_UI_WORDS = frozenset("""
share shares shared sharing tweet tweets retweet email e mail print printer pin pinit save saved
whatsapp facebook twitter linkedin reddit pinterest flipboard messenger telegram tumblr instagram
youtube tiktok pocket mix sms copy link links url shortlink short get permalink feed rss comment
comments reply replies like likes view views follow following subscribe unsubscribe login log in
sign up out register menu search close open home back to top next previous prev skip content
main navigation more less show hide toggle expand collapse advertisement advert ad ads sponsored
promoted caption credit image images photo photos video videos gallery slideshow of play pause
mute unmute fullscreen full screen via on the this article story post page it and or a
""".split())
_FUNCTION_WORDS = frozenset("a and or the this it of on in to via out up for".split())
_CAMEL = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


def _ui_only(s: str) -> bool:
    words = _CAMEL.findall(s)
    if not words or len(words) > 14 or s.endswith((".", "?", "!", ",", "-")):
        return False
    if len(words) == 1 and s.endswith(":"):  # "Page:", a speaker or a field label
        return False
    content = [w.lower() for w in words if not w.isdigit()]
    return (bool(content) and all(w in _UI_WORDS for w in content)
            and not all(w in _FUNCTION_WORDS for w in content))


# ----------------------------------------------------------------- 2.-7. line patterns

# "... from|in|on <Section Name>": up to 5 words, the first one capitalised
_SECTION = r"(?:\ (?:from|in|on)\ (?-i:[A-Z0-9\u00C0-\u024F])\S*(?:\ \S+){0,4})?"
_LIST_OF = r"(?:\ (?:news|articles?|posts?|stories|content|links|reading|coverage|videos?|topics))?"

_NAV = re.compile(
    r"""^\W*(?:
        (?:read|see|view|show|load|click\ here\ for)\ (?:more|all|full\ story|the\ full\ story|comments?)
            (?:\ (?:on|from|about|at)\b.*)?
      | continue\ reading(?:\ below|\ the\ main\ story)?
      | you\ (?:may|might)\ also\ (?:like|enjoy) | we\ recommend
      | recommended(?:\ for\ you|\ stories|\ articles|\ reading)?
      | (?:related|similar|more|other|latest|popular|trending|top|breaking){_LIST_OF}{_SECTION}
      | most\ (?:read|popular|viewed|shared|commented){_SECTION}
      | (?:don'?t|do\ not)\ miss(?:\ (?:it|this|out))?
      | explore\ further | see\ also | also\ (?:read|see) | back\ to\ top | top\ of\ page | jump\ to\ navigation.*
      | (?:next|previous)\ (?:article|post|story)
      | about\ the\ authors? | learn\ more | listen\ live | powered\ by | feedback(?:\ to\ editors)?
      | sponsored\ links? | skip\ to\ .{1,30} | get\ (?:the\ )?app
      | (?:leave|post|add|write|view|show|hide)\ (?:a\ |your\ )?(?:comments?|reply|replies)
      | \d+\ (?:comments?|replies|shares|likes|views)
      | comments?(?:\ \(\d+\))?
      | sharing\ is\ caring
      | (?:image|photo|video|slide)\ \d+\ of\ (?:/\ )?\d+
      | (?:image\ copyright|image\ caption|media\ caption|getty\ images|shutterstock)
      | (?:tags?|filed\ under|posted\ in)\b\s*:?.{0,100}
      | (?:topics?|categories|category|labels?|keywords)\s*:.{0,100}
      | lesen\ sie\ (?:auch|mehr) | mehr\ zum\ thema | anzeige | werbung | zurück\ zur\ übersicht
      | lire\ (?:aussi|la\ suite) | à\ lire\ aussi | publicité
      | leia\ (?:mais|também) | veja\ também | publicidade
      | lee\ también | ver\ más | publicidad | noticias\ relacionadas
      | leggi\ anche | pubblicità | baca\ juga | iklan | читайте\ также | реклама
      | 関連記事 | スポンサーリンク | スポンサードリンク | 広告 | 相关阅读 | 相关文章 | 广告
    )\W*$""".replace("{_SECTION}", _SECTION).replace("{_LIST_OF}", _LIST_OF),
    _X,
)

# rule 9: a heading that introduces a list of other pages
_HUB = re.compile(
    r"""^\W*(?:
        (?:you\ (?:may|might)\ also\ (?:like|enjoy)|we\ recommend|recommended|related|similar|more|other|latest
          |popular|trending|top|most\ (?:read|popular|viewed|shared)|(?:don'?t|do\ not)\ miss|explore\ further
          |see\ also|also\ (?:read|see)|read\ more|more\ from|more\ in|more\ on){_LIST_OF}{_SECTION}
      | 関連記事 | lesen\ sie\ auch | mehr\ zum\ thema | leia\ também | veja\ também | lire\ aussi
      | noticias\ relacionadas | baca\ juga | читайте\ также
    )\W*$""".replace("{_SECTION}", _SECTION).replace("{_LIST_OF}", _LIST_OF),
    _X,
)

_LABELLED = re.compile(
    r"""^\W*(?:
        (?i:related|see\ more|read\ more|read\ also|also\ read|also\ see|see\ also|also|more|watch|must\ read
           |recommended|trending|top\ stories|latest|more\ from\ \w+)\s*:\s*\S.{0,150}
      | (?:SEE\ MORE|READ\ MORE|RELATED|MORE)(?=[A-Z][a-z]).{0,150}
    )$""",
    re.VERBOSE,
)
_TEASER_TAG = re.compile(
    r"^(?=(?:[\W_]*\w+\b){3}).{0,150}"
    r"\[(?:[A-Z][A-Z ]{2,15}|(?i:video|photos?|pics|gallery|watch|poll|quiz|live))\]\W*$"
)

_SUB_KEYS = ("newsletter", "subscri", "inbox", "sign", "regist", "join", "app", "follow us", "like us",
             "become a", "journalism")
_SUBSCRIBE = re.compile(
    r"""(?:^\W*(?:subscribe|sign\ up)(?![\w'’])
      | ^\W*register\ (?:now|here|today|for|to)\b
      | ^\W*join\ (?:us|our|now|today|free|for\ free|the\ conversation)\b
      | \b(?:our|my|the|free|daily|weekly|e-?mail)\ (?:[\w.’'-]+\ ){0,3}newsletters?\b
      | ^\W*(?:[\w.’'-]+\ ){0,2}newsletters?(?:\ sign[\ -]?up)?\W*$
      | \binbox\b | thanks\ for\ (?:signing|subscribing) | successfully\ subscribed
      | \byour\ subscription\b | \bsubscriber\ (?:experience|access|content|only)
      | \b(?:by|when)\ subscribing\b | subscribing\ (?:to|for)\ (?:our|the)\b
      | download\ (?:our|the)\ app | get\ the\ app | follow\ us\ on | like\ us\ on\ facebook | \bjoin\ our\b
      | become\ a\ (?:member|subscriber|patron) | support\ (?:our|independent)\ journalism)""",
    _X,
)
_CTA = re.compile(
    r"""^\W*(?:if\ you\ (?:enjoyed|liked|found|value|appreciated?)\ (?:this|our|reading)
      | follow\ (?:us|me|him|her|them|\w+'s(?:\ full)?\ coverage)\b
        .*(?:twitter|facebook|instagram|linkedin|youtube|https?://))""",
    _X,
)
_FOLLOW = re.compile(
    r"\bfollow (?:us|me|him|her|them|\w+) (?:on|at) (?:twitter|facebook|instagram|linkedin|youtube|tiktok)\b", _I)
_CAPS_CTA = re.compile(r"^(?=[^a-z]*$).*\b(?:CLICK|TAP) HERE\b")
_NOTICE = re.compile(r"requires? javascript|enable javascript|javascript (?:is )?disabled", _I)

_LEGAL = re.compile(
    r"(?:^\W*(?:©|\(c\)|copyright\b)|all rights reserved|\b(?:use|uses|using|accept|allow)(?: all)? cookies\b"
    r"|\bcookies? (?:policy|settings|preferences|consent)\b)",
    _I,
)
_FOOTER_LINKS = re.compile(r"privacy (?:policy|notice|statement)|terms (?:of|and) (?:use|service|conditions)", _I)

_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sept?(?:ember)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_MONTH_RE = re.compile(rf"^{_MONTH}$", _I)
_DAY = r"(?:mon|tue|wed|thu|fri|sat|sun)[a-z]*\.?"
_TIME = r"\d{1,2}[:.]\d{2}(?:\s?[ap]\.?m\.?)?"
_DATE_TOKEN = re.compile(
    rf"^(?:{_MONTH}|{_DAY}|\d{{1,4}}(?:st|nd|rd|th)?|{_TIME}|\d{{1,2}}[:.]\d{{2}}[ap]m|[ap]\.?m\.?"
    r"|at|on|of|the|\||-|–|—|,|/|\.|gmt|utc|est|edt|cst|cdt|pst|pdt|cet|cest|bst|ist|hkt|jst|aest)$",
    _I,
)
_DATE_LEAD = re.compile(
    r"^\W*(?:first\ |last\ )?(?:published|updated|posted|modified|created|date|dated)(?:\ (?:on|at|by))?\s*:?\s*",
    _X,
)
_DATE_SPLIT = re.compile(r"\d{1,2}[:.]\d{2}[ap]m|[\w.:]+|[^\w\s]", _I)
_NUMERIC_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b")
_ISO_STAMP = re.compile(r"^\W*\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)?\W*$")
_STAMP_DATE = re.compile(
    rf"(?:\b{_MONTH}\s*\d{{1,2}}(?:st|nd|rd|th)?,?\s+(?:19|20)\d\d\b|\b\d{{1,2}}\.?\s+{_MONTH}\s+(?:19|20)\d\d\b"
    rf"|\b\d{{1,2}}/\d{{1,2}}/(?:19|20)?\d\d\b|\b(?:19|20)\d\d-\d\d-\d\d\b)",
    _I,
)
_STAMP_TIME = re.compile(rf"\b{_TIME}\b|\b\d{{1,2}}[:.]\d{{2}}[ap]m\b|\b[ap]\.?m\.?(?=\W|$)", _I)
_STAMP_WORDS = frozenset(("by", "posted", "published", "updated"))
_BYLINE = re.compile(
    r"^\W*(?:by|written\ by|posted\ by|reporting\ by|additional\ reporting\ by|edited\ by|story\ by|words\ by"
    r"|von|par|por)\s+(\S.{0,80})$",
    _X,
)
_NAME_JOINERS = frozenset("and & de da di van von der den la le du del dos of the und et y e".split())
_NAME_WORD = re.compile(r"[^\W\d_][\w'’.-]*")
_AGENCY = re.compile(
    r"""^\W*(?:the\ )?(?:associated\ press|reuters|afp|agence\ france-presse|bloomberg|upi|dpa|ansa|efe|xinhua
      |news\ agencies|wire\ services?)\W*$""",
    _X,
)
_SOURCE = re.compile(r"^\W*(?:source|sources|quelle|fuente|fonte)\s*:\s*.{1,60}$", _I)
_READING = re.compile(
    r"^\W*(?:\d+\s*(?:min(?:ute)?s?)\s*read|reading time\b.*|tempo de leitura\b.*|lesezeit\b.*"
    r"|temps de lecture\b.*)\W*$",
    _I,
)
_CAPTION_END = re.compile(
    r"\((?:[^()]*(?:\b(?i:photo|image|credit|getty|shutterstock|istock)"
    r"|\b(?:via AP|AP Photo|AFP|EPA|Reuters|File)\b)[^()]*)\)\s*$"
)
_CAPTION_START = re.compile(r"^\W*(?:photo|image|picture|credit|foto|bild)\s*(?:credit)?\s*:\s*.{0,120}$", _I)
_CREDIT = re.compile(r"\b(?:getty\s*images|shutterstock|istock(?:photo)?|ap photo)\b", _I)
_AGENCY_WORD = re.compile(r"\b(?:associated press|afp|reuters|epa|bloomberg)\b", _I)
_MEDIA_COUNT = re.compile(r"^\W*\(?\d+\s+(?:videos?|photos?|images?|pictures?|slides?)\)?\W*$", _I)
_SHORTCODE = re.compile(r"^\[([a-z_][\w-]*)\b(?:[^\]]*=[^\]]*\].*|[^\]]*\].*\[/\1\])$", _I)
_URL_LINE = re.compile(r"^(?:https?://|www\.)\S+$", _I)
_IMAGE_URL = re.compile(r"^\W*(?:https?://|www\.)\S+\.(?:jpe?g|png|gif|webp|svg|ico)(?:\?\S*)?\W*$", _I)


def _ntok(s: str) -> int:
    return len(_WORD.findall(s))


def _name_shaped(s: str) -> bool:
    """Names after "By": a few capitalised words ("Jane Doe and John Roe", "The Associated Press")."""
    if s.endswith((",", ";", ":", ".", "!", "?")) and not s.endswith(("Jr.", "Sr.")):
        return False
    words = [w for w in _NAME_WORD.findall(s) if w.lower() not in _NAME_JOINERS]
    return 1 <= len(words) <= 8 and sum(w[0].isupper() for w in words) >= 0.75 * len(words)


def _is_date_line(s: str) -> bool:
    """Only a date / time, optionally behind "Published", "Updated at", ... (rule 6)."""
    s2 = _DATE_LEAD.sub("", s, count=1)
    if not _DIGIT.search(s2):
        return False
    toks = _DATE_SPLIT.findall(s2)
    if not toks or len(toks) > 16:
        return False
    months = sum(bool(_MONTH_RE.match(t)) for t in toks)
    if months > 1:  # a date range (event dates) is content, a single date is a stamp
        return False
    if not (months or s2 != s or _NUMERIC_DATE.search(s2)):
        return False
    return all(_DATE_TOKEN.match(t) for t in toks)


def _is_stamp(s: str) -> bool:
    """A name (or a section) plus one dated timestamp: "Chris Davies - Nov 19, 2019, 10:31 pm CST" (rule 6)."""
    if len(s) > 100 or "@" in s or len(_STAMP_DATE.findall(s)) != 1:
        return False
    if s.endswith((".", "!", "?")) and not s.lower().endswith(("a.m.", "p.m.")):
        return False
    rest = _STAMP_TIME.sub(" ", _STAMP_DATE.sub(" ", s))
    words = [w for w in _WORD.findall(rest) if not _DATE_TOKEN.match(w) and w.lower() not in _STAMP_WORDS]
    return len(words) <= 5


def _rule(s: str) -> str | None:
    """The name of the first per-line rule (1-7) that marks `s` as boilerplate, else None.
    Cheap substring tests guard the costlier patterns: most lines are prose and fail them all."""
    n = len(s)
    if n > _LONG:
        return None
    low = s.lower()
    if s[0] == "[" and _SHORTCODE.match(s):
        return "shortcode"
    if ("©" in s or "(c)" in low or "copyright" in low or "rights reserved" in low or "cookie" in low) and (
            _LEGAL.search(s) if n <= _SHORT else _LEGAL.search(s[:40])):
        return "legal"
    if s.endswith(")") and _CAPTION_END.search(s):
        return "caption"
    if ("follow" in low or "if you" in low) and (_CTA.match(s) or _FOLLOW.search(s)):
        return "cta"
    if "javascript" in low and _NOTICE.search(s):
        return "notice"
    if n > _SHORT:
        return None
    digit = _DIGIT.search(s) is not None
    if _ui_only(s):
        return "ui"
    if _NAV.match(s):
        return "nav"
    if _LABELLED.match(s):
        return "labelled"
    if "]" in s and _TEASER_TAG.search(s):
        return "teaser"
    if any(k in low for k in _SUB_KEYS) and _SUBSCRIBE.search(s):
        return "subscribe"
    if "HERE" in s and _CAPS_CTA.match(s):
        return "cta"
    if ("privacy" in low or "terms" in low) and _FOOTER_LINKS.search(s) and _ntok(s) <= 12:
        return "legal"
    if _AGENCY.match(s) or _SOURCE.match(s) or _READING.match(s):
        return "byline"
    m = _BYLINE.match(s)
    if m and (_name_shaped(m.group(1)) or (digit and _is_stamp(s))):
        return "byline"
    if digit and (_ISO_STAMP.match(s) or _is_date_line(s) or _is_stamp(s)):
        return "date"
    if _CAPTION_START.match(s):
        return "caption"
    if digit and _MEDIA_COUNT.match(s):
        return "media"
    if n <= 100 and not s.endswith(_SENTENCE_END) and (
            _CREDIT.search(s) or (_AGENCY_WORD.search(s) and any(c in s for c in ",|/"))) and _ntok(s) <= 10:
        return "credit"
    if ("://" in s or "www." in low) and _IMAGE_URL.match(s):
        return "image_url"
    return None


# ----------------------------------------------------------------- 8.-14. structure


def _headline(s: str) -> bool:
    """A heading / link-text shaped line: a few words, no sentence-final punctuation."""
    return (3 <= _ntok(s) <= 25 and len(s) <= 150 and not s.endswith(_HEADLINE_BAD_END)
            and not _SENTENCE_BREAK.search(s) and "www." not in s and "://" not in s)


def _linkish(s: str) -> bool:
    """Looser: an item of a link list may be a headline with '?' or a one-line standfirst."""
    return 1 <= _ntok(s) <= 30 and len(s) <= 200


def _prose(s: str) -> bool:
    return len(s) >= 40 and (s.endswith(_SENTENCE_END) or _SENTENCE_BREAK.search(s) is not None)


_BULLET = re.compile(r"^(?:[-•*–·▪►»]|\d{1,2}[.)])\s+(.*)$")
_PIPED = re.compile(r"^[^|]{3,60} \| ([^|]+)$")
_TITLE_WORD = re.compile(r"[^\W\d_][\w'’-]*")


def _title_case(s: str) -> bool:
    words = [w for w in _TITLE_WORD.findall(s) if len(w) >= 4]
    return len(words) >= 2 and sum(w[0].isupper() for w in words) >= 0.75 * len(words)


def _bullet_title(s: str) -> bool:
    m = _BULLET.match(s)
    return bool(m) and _headline(m.group(1).rstrip("?")) and _title_case(m.group(1))


def _piped_title(s: str) -> bool:
    m = _PIPED.match(s)
    return bool(m) and _ntok(m.group(1)) >= 4 and _headline(s)


def _drop_runs(idx: list[int], st: list[str], drop: list, pred, min_run: int, name: str,
               tail: int | None = None) -> None:
    """Mark runs of >= min_run consecutive lines satisfying pred; with `tail`, only a run followed by
    at most `tail` more lines (a list at the very end of the text)."""
    run: list[int] = []
    for k, i in enumerate(idx + [-1]):
        if i >= 0 and pred(st[i]):
            run.append(i)
            continue
        if len(run) >= min_run and (tail is None or len(idx) - k <= tail):
            for j in run:
                drop[j] = drop[j] or name
        run = []


def strip_boilerplate(text: str) -> str:
    """`text` without its boilerplate lines (see the module docstring); "" for a page of links only."""
    return _strip(text)[0]


def _strip(text: str) -> tuple[str, dict[int, str]]:
    """The stripped text and, for diagnostics, the rule that dropped each line (by line number)."""
    if not text:
        return text, {}
    lines = text.split("\n")
    st = [" ".join(line.split()) for line in lines]
    idx = [i for i, s in enumerate(st) if s]
    if (len(idx) >= 3 and all(len(st[i]) <= 150 and not _prose(st[i]) for i in idx)
            and sum(st[i].endswith(_VERSE_END) for i in idx) <= 0.2 * len(idx)):  # rule 8
        return "", {i: "no_prose" for i in idx}
    drop: list = [False] * len(lines)
    for i in idx:  # rules 1-7
        drop[i] = _rule(st[i]) or False
    for k, i in enumerate(idx):
        s = st[i]
        if len(s) <= 60 and _HUB.match(s):  # rule 9
            for j in idx[k + 1:]:
                if _SEPARATOR.match(st[j]) or _headline(st[j].rstrip("?!")):
                    drop[j] = drop[j] or "hub_list"
                else:
                    break
        elif _SEPARATOR.match(s):  # rule 10
            around = (idx[k - 2] if k >= 2 else -1, idx[k + 2] if k + 2 < len(idx) else -1)
            if any(j >= 0 and _SEPARATOR.match(st[j]) for j in around):
                for j in (idx[k - 1] if k >= 1 else -1, idx[k + 1] if k + 1 < len(idx) else -1):
                    if j >= 0 and _linkish(st[j]):
                        drop[j] = drop[j] or "separated"
        elif s.lower() in ("by", "von", "par", "por") and k + 1 < len(idx):  # rule 13
            drop[i] = "byline"
            j = idx[k + 1]
            if _ntok(st[j]) <= 5 and not st[j].endswith(_SENTENCE_END):
                drop[j] = drop[j] or "byline"
    seen: dict[str, int] = {}
    for k, i in enumerate(idx):  # rule 14
        if st[i].count(" ") < REPEAT_MIN_WORDS - 1:
            continue
        key = _BULLET.sub(r"\1", st[i]).lower()
        if key.count(" ") >= REPEAT_MIN_WORDS - 1:
            if key in seen and k - seen[key] <= REPEAT_WINDOW:
                drop[i] = drop[i] or "repeat"
            seen[key] = k
    _drop_runs(idx, st, drop, _bullet_title, 2, "bullet_titles", tail=2)  # rule 11
    _drop_runs(idx, st, drop, _piped_title, 2, "piped_titles")
    kept = [i for i in idx if not drop[i]]  # rule 12
    if kept and _URL_LINE.match(st[kept[0]]):  # the page's own address above the title
        drop[kept[0]] = "lead_url"
        kept = kept[1:]
    labels = []
    for i in kept[:LEAD_LABELS]:  # section labels ("Opinion", "TECH") above the title
        if _ntok(st[i]) <= 3 and len(st[i]) <= 30 and not st[i].endswith(_SENTENCE_END):
            labels.append(i)
        else:
            break
    heads = []
    for i in kept[len(labels):len(labels) + LEAD_MAX]:  # the title and its standfirst
        s = st[i]
        if _headline(s) and not s.isupper() and _ntok(s) >= 4 and not _BULLET.match(s):
            heads.append(i)
        else:
            break
    for i in (labels + heads) if heads else []:
        drop[i] = drop[i] or "lead_title"
    return "\n".join(line for line, d in zip(lines, drop) if not d), {i: d for i, d in enumerate(drop) if d}
