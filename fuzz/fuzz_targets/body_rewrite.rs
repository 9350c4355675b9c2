//! `JsonBody::parse` on arbitrary bytes, and the model rewrite of whatever parses: only the
//! model's bytes change, and the result is JSON with the new model.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use openrouter_proxy::pipeline::body::JsonBody;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the new model's length, taken from the end of the input.
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let cut = rest.len().saturating_sub(usize::from(len % 32));
    let (body, model) = rest.split_at(cut);
    let model = String::from_utf8_lossy(model).into_owned();
    let Ok(parsed) = JsonBody::parse(Bytes::copy_from_slice(body)) else {
        return;
    };
    let out = parsed.with_model(&model);
    match &parsed.model {
        None => assert_eq!(&out[..], body),
        Some((old, range)) => {
            let spelled: String = serde_json::from_slice(&body[range.clone()]).unwrap();
            assert_eq!(&spelled, old);
            let suffix = body.len() - range.end;
            assert_eq!(&out[..range.start], &body[..range.start]);
            assert_eq!(&out[out.len() - suffix..], &body[range.end..]);
            let again = JsonBody::parse(out).expect("the rewritten body is valid");
            assert_eq!(again.model(), Some(model.as_str()));
            assert_eq!(again.stream, parsed.stream);
        }
    }
});
