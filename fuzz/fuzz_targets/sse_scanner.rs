//! `Scanner::feed` on arbitrary bytes cut at arbitrary places: the same events, text and usage as
//! one whole feed, and every boundary just past a line terminator.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openrouter_proxy::sse::{Event, Scanner};

fn scan(stream: &[u8], cuts: &[usize], collect_text: bool) -> (Vec<Event>, Scanner) {
    let mut scanner = Scanner::new(collect_text);
    let mut events = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&stream.len())) {
        // Cut points may repeat: empty chunks must change nothing.
        let end = end.max(start);
        let chunk = &stream[start..end];
        if let Some(offset) = scanner.feed(chunk, |event| events.push(event)) {
            assert!(offset >= 1 && offset <= chunk.len());
            assert!(matches!(chunk[offset - 1], b'\n' | b'\r'));
        }
        start = end;
    }
    (events, scanner)
}

fuzz_target!(|data: &[u8]| {
    // The first four bytes choose the mode and up to three cut points.
    if data.len() < 4 {
        return;
    }
    let (head, stream) = data.split_at(4);
    let collect_text = head[0] & 1 == 1;
    let mut cuts: Vec<usize> = head[1..]
        .iter()
        .map(|&b| usize::from(b) * stream.len() / 255)
        .collect();
    cuts.sort_unstable();
    let (whole, one) = scan(stream, &[], collect_text);
    let (split, many) = scan(stream, &cuts, collect_text);
    assert_eq!(whole, split);
    assert_eq!(one.text, many.text);
    assert_eq!(one.usage, many.usage);
    assert_eq!(one.done, many.done);
});
