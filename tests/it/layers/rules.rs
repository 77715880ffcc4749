//! The rules themselves: the layer list as docs/contributors.md writes it, and what a set of
//! room dependencies may not do (go up a layer, or come back to where it started).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::deps::{self, Edge, Rooms};

/// Everything wrong with a tree: `sources` are (path relative to `src/`, text), `contributors`
/// the text of docs/contributors.md. Empty when the rules hold.
pub fn check(sources: &[(String, String)], contributors: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    let rooms = Rooms::declared(sources, &mut wrong);
    let mut edges = Vec::new();
    for (path, text) in sources {
        edges.extend(deps::scan(&rooms, path, text, &mut wrong));
    }
    match layers(contributors) {
        Ok(layers) => {
            wrong.extend(named_once(&layers, &rooms.all()));
            wrong.extend(upward(&layers, &edges));
        }
        Err(e) => wrong.push(e),
    }
    wrong.extend(cycles(&edges));
    wrong
}

/// The numbered list under "## Layout", lowest layer first. Each item starts with its rooms,
/// then a colon: "3. `error`, `retry`: every error; the one backoff policy".
pub fn layers(contributors: &str) -> Result<Vec<Vec<String>>, String> {
    let section = contributors
        .split("\n## ")
        .find(|s| s.starts_with("Layout"))
        .ok_or("docs/contributors.md has no \"## Layout\" section with the layer list")?;
    let mut layers = Vec::new();
    for line in section.lines() {
        let Some((number, item)) = line.split_once(". ") else {
            continue;
        };
        if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let malformed = || {
            format!(
                "docs/contributors.md, Layout item {number}: write it as \"`room`, `room`: what \
                 they are\" (found \"{item}\")"
            )
        };
        let (head, _) = item.split_once(':').ok_or_else(malformed)?;
        let rooms = head
            .split(',')
            .map(|name| {
                let name = name.trim();
                let inner = name.strip_prefix('`').and_then(|n| n.strip_suffix('`'));
                inner
                    .filter(|n| !n.is_empty() && !n.contains('`'))
                    .map(str::to_string)
                    .ok_or_else(malformed)
            })
            .collect::<Result<Vec<_>, _>>()?;
        layers.push(rooms);
    }
    if layers.is_empty() {
        return Err("docs/contributors.md, Layout: no numbered layer list".to_string());
    }
    Ok(layers)
}

/// The doc names every room of the code, each once, and nothing else.
fn named_once(layers: &[Vec<String>], rooms: &BTreeSet<String>) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut seen = BTreeSet::new();
    for name in layers.iter().flatten() {
        if !seen.insert(name) {
            wrong.push(format!(
                "docs/contributors.md, Layout: `{name}` is in more than one layer"
            ));
        }
        if !rooms.contains(name) {
            wrong.push(format!(
                "docs/contributors.md, Layout: `{name}` is no room under src/ (not a `mod` of \
                 lib.rs or main.rs): remove or rename it"
            ));
        }
    }
    for room in rooms {
        if !seen.contains(room) {
            wrong.push(format!(
                "`{room}` is a room under src/ in no layer of docs/contributors.md (Layout): add it"
            ));
        }
    }
    wrong
}

/// Each room may use rooms of its own layer or below.
fn upward(layers: &[Vec<String>], edges: &[Edge]) -> Vec<String> {
    let layer_of = |room: &str| layers.iter().position(|l| l.iter().any(|r| r == room));
    let mut wrong = Vec::new();
    for edge in first_of_each(edges).values() {
        if let (Some(own), Some(other)) = (layer_of(&edge.from), layer_of(&edge.to)) {
            if other > own {
                wrong.push(format!(
                    "{}: {} (layer {}) uses {} (layer {}), above it",
                    edge.at,
                    edge.from,
                    own + 1,
                    edge.to,
                    other + 1
                ));
            }
        }
    }
    wrong
}

/// The first place each (from, to) pair is seen.
fn first_of_each(edges: &[Edge]) -> BTreeMap<(&str, &str), &Edge> {
    let mut first = BTreeMap::new();
    for edge in edges {
        first.entry((&*edge.from, &*edge.to)).or_insert(edge);
    }
    first
}

/// No room reaches itself through others: one report for each group of rooms that all reach
/// each other, with one of its cycles spelled out and where each step of it is written.
fn cycles(edges: &[Edge]) -> Vec<String> {
    let first = first_of_each(edges);
    let mut next: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for &(from, to) in first.keys() {
        next.entry(from).or_default().insert(to);
    }
    let reach = |from: &str| -> BTreeSet<&str> {
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<&str> = next.get(from).into_iter().flatten().copied().collect();
        while let Some(room) = queue.pop_front() {
            if seen.insert(room) {
                queue.extend(next.get(room).into_iter().flatten().copied());
            }
        }
        seen
    };
    let reached: BTreeMap<&str, BTreeSet<&str>> = next.keys().map(|&r| (r, reach(r))).collect();
    let mut reported = BTreeSet::new();
    let mut wrong = Vec::new();
    for (&start, from_start) in &reached {
        if !from_start.contains(start) || reported.contains(start) {
            continue;
        }
        // `start` is the smallest name of its group (the map is sorted).
        let group: BTreeSet<&str> = from_start
            .iter()
            .copied()
            .filter(|r| reached.get(r).is_some_and(|back| back.contains(start)))
            .collect();
        reported.extend(group.iter().copied());
        let path = shortest_cycle(start, &next);
        let steps: Vec<String> = path
            .windows(2)
            .map(|w| format!("{} -> {} at {}", w[0], w[1], first[&(w[0], w[1])].at))
            .collect();
        wrong.push(format!(
            "cycle: {} ({}; rooms that reach each other: {})",
            path.join(" -> "),
            steps.join(", "),
            group.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    wrong
}

/// The shortest way from `start` back to itself (breadth first), `start` at both ends.
fn shortest_cycle<'a>(start: &'a str, next: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<&'a str> {
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(room) = queue.pop_front() {
        for &to in next.get(room).into_iter().flatten() {
            if to == start {
                let mut path = vec![start, room];
                let mut at = room;
                while at != start {
                    at = came_from[at];
                    path.push(at);
                }
                path.reverse();
                return path;
            }
            if !came_from.contains_key(to) {
                came_from.insert(to, room);
                queue.push_back(to);
            }
        }
    }
    unreachable!("{start} is on a cycle")
}
