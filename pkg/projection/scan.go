package projection

import "strings"

// The scanner below is a small subset of SQLite's tokenizer (tokenize.c):
// enough to find parameters, statement boundaries and leading keywords
// without mistaking the inside of a string, a quoted identifier or a comment
// for SQL. Where it must agree with SQLite, on what a parameter is, it
// follows SQLite's rules exactly; anything it cannot classify it leaves for
// SQLite to reject when the statement is prepared.

// tokenKind classifies a token.
type tokenKind uint8

const (
	tokWord      tokenKind = iota // identifier or keyword
	tokQuoted                     // "identifier", [identifier] or `identifier`
	tokString                     // 'literal'
	tokNumber                     // numeric literal
	tokParam                      // :name, the one parameter form allowed
	tokBadParam                   // ?, ?NNN, @name, $name, #name and odd :forms
	tokSemicolon                  // ;
	tokPunct                      // anything else
)

// token is one token of a statement; comments and spaces are not tokens.
type token struct {
	kind tokenKind
	text string // the source text, quotes included
	pos  int    // byte offset in the statement
}

func (t token) end() int { return t.pos + len(t.text) }

// is reports whether t is the keyword kw, in any case.
func (t token) is(kw string) bool { return t.kind == tokWord && strings.EqualFold(t.text, kw) }

// ParamNames returns the names of the :name parameters of a SQL statement,
// without the colon, in order of first appearance and without repeats.
// Strings, quoted identifiers and comments are skipped, so 'a:b' holds no
// parameter. Other parameter forms (?, @name, $name) are not listed;
// [Compile] refuses them.
func ParamNames(sql string) []string {
	var names []string
	for _, t := range scan(sql) {
		if t.kind != tokParam {
			continue
		}
		name := t.text[1:]
		if !contains(names, name) {
			names = append(names, name)
		}
	}
	return names
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// scan splits sql into tokens. It never fails: an unterminated string or
// comment runs to the end, and SQLite reports it when the statement is
// prepared.
func scan(sql string) []token {
	var toks []token
	n := len(sql)
	emit := func(kind tokenKind, from, to int) {
		toks = append(toks, token{kind: kind, text: sql[from:to], pos: from})
	}
	for i := 0; i < n; {
		c := sql[i]
		next := byte(0)
		if i+1 < n {
			next = sql[i+1]
		}
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			i++
		case c == '-' && next == '-':
			if j := strings.IndexByte(sql[i:], '\n'); j >= 0 {
				i += j + 1
			} else {
				i = n
			}
		case c == '/' && next == '*':
			if j := strings.Index(sql[i+2:], "*/"); j >= 0 {
				i += 2 + j + 2
			} else {
				i = n
			}
		case c == '\'':
			j := quoteEnd(sql, i, '\'')
			emit(tokString, i, j)
			i = j
		case c == '"' || c == '`':
			j := quoteEnd(sql, i, c)
			emit(tokQuoted, i, j)
			i = j
		case c == '[':
			j := n
			if k := strings.IndexByte(sql[i:], ']'); k >= 0 {
				j = i + k + 1
			}
			emit(tokQuoted, i, j)
			i = j
		case c == ';':
			emit(tokSemicolon, i, i+1)
			i++
		case c == ':' || c == '@' || c == '$' || c == '#':
			j, n, plain := variableEnd(sql, i)
			switch {
			case n == 0:
				// A sigil with no name, which SQLite rejects. Take a
				// run of colons with it, so that a::b holds no :b.
				j = i + 1
				for c == ':' && j < len(sql) && sql[j] == ':' {
					j++
				}
				emit(tokPunct, i, j)
			case plain && c == ':' && isNameStart(sql[i+1]):
				emit(tokParam, i, j)
			default:
				emit(tokBadParam, i, j)
			}
			i = j
		case c == '?':
			j := i + 1
			for j < n && isDigit(sql[j]) {
				j++
			}
			emit(tokBadParam, i, j)
			i = j
		case isDigit(c) || c == '.' && isDigit(next):
			j := i + 1
			for j < n && (isIDChar(sql[j]) || sql[j] == '.') {
				j++
			}
			emit(tokNumber, i, j)
			i = j
		case isIDChar(c) && c != '$':
			j := i + 1
			for j < n && isIDChar(sql[j]) {
				j++
			}
			emit(tokWord, i, j)
			i = j
		default:
			emit(tokPunct, i, i+1)
			i++
		}
	}
	return toks
}

// quoteEnd returns the offset just past the quoted text starting at i, where
// a doubled quote stands for itself.
func quoteEnd(sql string, i int, q byte) int {
	for j := i + 1; j < len(sql); j++ {
		if sql[j] != q {
			continue
		}
		if j+1 < len(sql) && sql[j+1] == q {
			j++
			continue
		}
		return j + 1
	}
	return len(sql)
}

// variableEnd returns the end of the variable whose sigil is at i, as SQLite
// reads it, how many name characters it has and whether it is a plain name.
// SQLite also accepts Tcl-style forms, :a::b, :::a and :a(x), as one
// variable; they are not plain, because the name SQLite would bind is not
// the name ParamNames reports.
func variableEnd(sql string, i int) (end, n int, plain bool) {
	j := i + 1
	plain = true
	for j < len(sql) {
		c := sql[j]
		switch {
		case isIDChar(c):
			n++
			j++
			if c == '$' || c >= 0x80 {
				plain = false
			}
			continue
		case c == '(' && n > 0:
			k := strings.IndexByte(sql[j:], ')')
			if k < 0 {
				return len(sql), n, false
			}
			return j + k + 1, n, false
		case c == ':' && j+1 < len(sql) && sql[j+1] == ':':
			j += 2
			plain = false
			continue
		}
		break
	}
	return j, n, plain
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isNameStart(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' }

// isIDChar is SQLite's IdChar: letters, digits, _, $ and every byte of a
// multi-byte UTF-8 character.
func isIDChar(c byte) bool { return isNameStart(c) || isDigit(c) || c == '$' || c >= 0x80 }

// split returns the tokens of the first statement of sql, and the first token
// of a second statement if there is one. Extra semicolons are empty
// statements and do not count.
func split(toks []token) (first []token, extra *token) {
	for i, t := range toks {
		if t.kind != tokSemicolon {
			continue
		}
		for _, u := range toks[i+1:] {
			if u.kind != tokSemicolon {
				return toks[:i], &u
			}
		}
		return toks[:i], nil
	}
	return toks, nil
}

// verb returns the keyword that says what a statement does, in upper case:
// its first word, or for WITH the word after the common table expressions.
// It returns "" for a statement that does not start with a word.
func verb(toks []token) string {
	if len(toks) == 0 || toks[0].kind != tokWord {
		return ""
	}
	first := strings.ToUpper(toks[0].text)
	if first != "WITH" {
		return first
	}
	// WITH [RECURSIVE] name [(columns)] AS [[NOT] MATERIALIZED] (body), ...
	// verb: the statement proper is the first word after a closing
	// parenthesis at depth 0 other than the AS that follows a column list.
	// Searching for any SELECT or DELETE would be fooled by a table named
	// replace, which SQLite allows.
	depth := 0
	for i, t := range toks {
		if t.kind != tokPunct {
			continue
		}
		switch t.text {
		case "(":
			depth++
		case ")":
			depth--
			if depth == 0 && i+1 < len(toks) && toks[i+1].kind == tokWord && !toks[i+1].is("AS") {
				return strings.ToUpper(toks[i+1].text)
			}
		}
	}
	return first
}

// unquote returns the name an identifier token stands for.
func unquote(t token) string {
	if t.kind != tokQuoted || len(t.text) < 2 {
		return t.text
	}
	open, last := t.text[0], t.text[len(t.text)-1]
	inner := t.text[1 : len(t.text)-1]
	switch {
	case open == '[' && last == ']':
		return inner
	case open == last:
		return strings.ReplaceAll(inner, string([]byte{open, open}), string(open))
	}
	return t.text // unterminated; SQLite will say so
}
